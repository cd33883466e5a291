"""Datasets of the ``memloss`` command: embedded digits, fake-cifar, and local-folder errors."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from memloss_addon.experiments.datasets import (
    DatasetNotFoundError,
    load_dataset,
    load_digits,
    load_fake_cifar,
)

sklearn_datasets = pytest.importorskip("sklearn.datasets")


def _stack(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*[(item[0], item[1]) for item in dataset], strict=True)
    return torch.stack(xs), torch.stack(ys)


def test_digits_shapes_range_and_split_sizes():
    splits = load_digits()
    x_train, y_train = _stack(splits.train)
    x_test, y_test = _stack(splits.test)
    # 1,797 images; 20% held out: ceil(0.2 * 1797) = 360 test, 1437 train.
    assert (len(splits.train), len(splits.test)) == (1437, 360)
    assert x_train.shape == (1437, 1, 8, 8) and x_test.shape == (360, 1, 8, 8)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert splits.sample_shape == (1, 8, 8) and splits.num_classes == 10
    assert not splits.synthetic
    for x in (x_train, x_test):
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
        # Pixel values are integers 0..16 divided by 16.
        assert torch.equal(x * 16, (x * 16).round())


def test_digits_split_is_a_stratified_partition_of_the_bundled_images():
    images, labels = sklearn_datasets.load_digits(return_X_y=True)
    splits = load_digits()
    x_train, y_train = _stack(splits.train)
    x_test, y_test = _stack(splits.test)
    # Together the two sets are exactly the bundled images (rows compared as sorted byte strings).
    ours = sorted(
        (row.tobytes(), int(label))
        for row, label in zip(
            (torch.cat([x_train, x_test]).reshape(-1, 64) * 16).numpy().astype(np.float64),
            torch.cat([y_train, y_test]).tolist(),
            strict=True,
        )
    )
    theirs = sorted((row.tobytes(), int(label)) for row, label in zip(images, labels, strict=True))
    assert ours == theirs
    # Stratified: each class's test count is its total times 0.2, rounded either way.
    totals = collections.Counter(labels.tolist())
    test_counts = collections.Counter(y_test.tolist())
    for label, total in totals.items():
        assert abs(test_counts[label] - 0.2 * total) <= 1


def test_digits_split_is_fixed_by_its_seed():
    first, again, other = load_digits(), load_digits(), load_digits(split_seed=1)
    assert torch.equal(_stack(first.test)[0], _stack(again.test)[0])
    assert torch.equal(_stack(first.train)[1], _stack(again.train)[1])
    assert not torch.equal(_stack(first.test)[0], _stack(other.test)[0])


def test_training_items_carry_their_index():
    splits = load_digits()
    x, y, idx = splits.train[5]
    assert idx == 5
    inner_x, inner_y = splits.train.dataset[5]
    assert torch.equal(x, inner_x) and int(y) == int(inner_y)


def test_digits_rejects_bad_test_fraction():
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=1.5)


def test_fake_cifar_is_seeded_cifar_shaped_noise():
    a = load_fake_cifar(num_train=6, num_test=3, seed=4)
    b = load_fake_cifar(num_train=6, num_test=3, seed=4)
    c = load_fake_cifar(num_train=6, num_test=3, seed=5)
    xa, ya = _stack(a.train)
    assert xa.shape == (6, 3, 32, 32) and len(a.test) == 3
    assert float(xa.min()) >= 0.0 and float(xa.max()) <= 1.0
    assert ya.min() >= 0 and ya.max() < 10
    assert a.synthetic and a.sample_shape == (3, 32, 32)
    assert torch.equal(xa, _stack(b.train)[0])
    assert not torch.equal(xa, _stack(c.train)[0])
    with pytest.raises(ValueError, match="num_train"):
        load_fake_cifar(num_train=0)


@pytest.mark.parametrize(
    ("name", "expected_file"),
    [
        ("cifar10", "cifar-10-batches-py/data_batch_1"),
        ("cifar100", "cifar-100-python/train"),
        ("svhn", "train_32x32.mat"),
    ],
)
def test_missing_local_dataset_names_folder_and_files(tmp_path, name, expected_file):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, data_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    assert expected_file in message
    assert "never downloads" in message
    assert isinstance(info.value, FileNotFoundError)


def test_partly_present_cifar_lists_only_the_missing_files(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ("data_batch_1", "data_batch_2"):
        (folder / name).write_bytes(b"")
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    missing_part = str(info.value).split("Expected files")[0]
    assert "data_batch_3" in missing_part and "data_batch_1" not in missing_part


def test_unknown_dataset_and_bad_augment():
    with pytest.raises(ValueError, match="'mnist'"):
        load_dataset("mnist")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="augment"):
        load_dataset("digits", augment=True)
