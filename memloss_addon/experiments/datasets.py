"""Datasets for ``memloss``: embedded digits, synthetic CIFAR-shaped data, local CIFAR/SVHN.

Nothing here ever downloads. ``digits`` is scikit-learn's bundled copy of the UCI optical
handwritten digits (1,797 real 8x8 images), so the command works offline out of the box.
``fake-cifar`` is seeded noise of CIFAR's shape, meant only for speed checks: its accuracies mean
nothing. CIFAR-10, CIFAR-100 and SVHN are read with torchvision from a folder the user filled;
when the files are missing the error names the folder and the files expected there.

Every loader returns a :class:`DatasetSplits` whose training set is wrapped in
:class:`~memloss_addon.data.IndexedDataset`, so its items are ``(x, y, idx)`` as the memory needs.
Images are float32 in ``[0, 1]`` with shape ``(C, H, W)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import Dataset, TensorDataset

from memloss_addon.data import IndexedDataset
from memloss_addon.experiments.names import DATASET_NAMES, DatasetName

__all__ = [
    "DATASET_NAMES",
    "DatasetName",
    "DatasetSplits",
    "DatasetNotFoundError",
    "load_dataset",
    "load_digits",
    "load_fake_cifar",
]


_EXAMPLES_HINT = 'pip install "memloss-addon[examples]"'


class DatasetNotFoundError(FileNotFoundError):
    """A local dataset folder is missing or incomplete (the command never downloads)."""


@dataclass(frozen=True)
class DatasetSplits:
    """A train/test pair plus what a model and a memory need to know about it.

    Attributes:
        name: The dataset's name, one of :data:`DATASET_NAMES`.
        train: Training set; items are ``(x, y, idx)``.
        test: Test set; items are ``(x, y)``.
        num_classes: Number of classes.
        sample_shape: Shape ``(C, H, W)`` of one image.
        synthetic: True when the data are random (``fake-cifar``): accuracies are meaningless.
        split_seed: Seed of the split (digits) or of the tensors (fake-cifar); 0 otherwise.
        augment: Whether the training set applies random crop/flip.
    """

    name: str
    train: IndexedDataset
    test: Dataset
    num_classes: int
    sample_shape: tuple[int, int, int]
    synthetic: bool
    split_seed: int = 0
    augment: bool = False


def load_digits(*, split_seed: int = 0, test_fraction: float = 0.2) -> DatasetSplits:
    """scikit-learn's bundled handwritten digits, split into stratified train and test sets.

    The 1,797 grey 8x8 images have integer pixel values 0..16, scaled here to ``[0, 1]`` by
    dividing by 16. The split is stratified by class and fixed by ``split_seed``, so the test set
    stays the same across training seeds.

    Args:
        split_seed: Seed of the train/test split (default: 0).
        test_fraction: Fraction of images held out for testing, in (0, 1) (default: 0.2, which
            gives 1,437 training and 360 test images).

    Returns:
        The splits, with images of shape ``(1, 8, 8)``.

    Raises:
        ValueError: If ``test_fraction`` is not in (0, 1).
        ImportError: If scikit-learn is not installed.

    Example:
        >>> splits = load_digits()
        >>> len(splits.train), len(splits.test), splits.sample_shape
        (1437, 360, (1, 8, 8))
        >>> x, y, idx = splits.train[0]
        >>> float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        True
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:
        raise ImportError(f"the 'digits' dataset needs scikit-learn: {_EXAMPLES_HINT}") from err
    images, labels = sklearn_load_digits(return_X_y=True)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=test_fraction, stratify=labels, random_state=split_seed
    )

    def to_tensors(x, y) -> TensorDataset:
        # Pixel values are integers 0..16; dividing by 16 maps them exactly onto [0, 1].
        x = torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        return TensorDataset(x, torch.as_tensor(y, dtype=torch.int64))

    return DatasetSplits(
        name="digits",
        train=IndexedDataset(to_tensors(train_x, train_y)),
        test=to_tensors(test_x, test_y),
        num_classes=10,
        sample_shape=(1, 8, 8),
        synthetic=False,
        split_seed=split_seed,
    )


def load_fake_cifar(
    *, num_train: int = 2048, num_test: int = 512, num_classes: int = 10, seed: int = 0
) -> DatasetSplits:
    """Seeded uniform noise of CIFAR's shape with random labels: for speed checks only.

    The labels are independent of the images, so no model can beat chance on the test set; use it
    to time training steps and memory overhead, never to judge robustness.

    Args:
        num_train: Number of training images (default: 2048).
        num_test: Number of test images (default: 512).
        num_classes: Number of classes (default: 10).
        seed: Seed of the generator; the same seed gives the same tensors (default: 0).

    Returns:
        The splits, with images of shape ``(3, 32, 32)``.

    Raises:
        ValueError: If a size or the class count is not positive.

    Example:
        >>> splits = load_fake_cifar(num_train=8, num_test=4)
        >>> splits.train[0][0].shape, splits.synthetic
        (torch.Size([3, 32, 32]), True)
    """
    for name, value in (("num_train", num_train), ("num_test", num_test)):
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes!r}")
    generator = torch.Generator().manual_seed(seed)

    def make(n: int) -> TensorDataset:
        x = torch.rand(n, 3, 32, 32, generator=generator)
        y = torch.randint(0, num_classes, (n,), generator=generator)
        return TensorDataset(x, y)

    train = make(num_train)
    return DatasetSplits(
        name="fake-cifar",
        train=IndexedDataset(train),
        test=make(num_test),
        num_classes=num_classes,
        sample_shape=(3, 32, 32),
        synthetic=True,
        split_seed=seed,
    )


# What torchvision reads for each local dataset (paths relative to the data folder).
_EXPECTED_FILES: dict[str, tuple[str, ...]] = {
    "cifar10": tuple(
        f"cifar-10-batches-py/{name}"
        for name in (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
    ),
    "cifar100": ("cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"),
    "svhn": ("train_32x32.mat", "test_32x32.mat"),
}
_SOURCES: dict[str, str] = {
    "cifar10": "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, "
    "extracted into the folder",
    "cifar100": "cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, "
    "extracted into the folder",
    "svhn": "the 'Format 2' .mat files from http://ufldl.stanford.edu/housenumbers/",
}


def _check_local_files(name: str, root: Path) -> None:
    missing = [rel for rel in _EXPECTED_FILES[name] if not (root / rel).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"{name} not found in '{root}': missing {', '.join(missing)}. "
            f"Expected files: {', '.join(_EXPECTED_FILES[name])} "
            f"(get {_SOURCES[name]}). This command never downloads; put the files there or pass "
            f"--data-dir pointing at the folder that holds them."
        )


def _load_local(
    name: Literal["cifar10", "cifar100", "svhn"], root: Path, *, augment: bool
) -> DatasetSplits:
    _check_local_files(name, root)
    try:
        from torchvision import datasets, transforms
    except ImportError as err:
        raise ImportError(f"reading {name} needs torchvision: pip install torchvision") from err
    test_transform = transforms.ToTensor()
    train_transform = test_transform
    if augment:
        steps: list = [transforms.RandomCrop(32, padding=4)]
        if name != "svhn":  # flipping digits of house numbers changes what they show
            steps.append(transforms.RandomHorizontalFlip())
        train_transform = transforms.Compose([*steps, transforms.ToTensor()])
    try:
        if name == "svhn":
            train = datasets.SVHN(str(root), split="train", transform=train_transform)
            test = datasets.SVHN(str(root), split="test", transform=test_transform)
        else:
            cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
            train = cls(str(root), train=True, transform=train_transform, download=False)
            test = cls(str(root), train=False, transform=test_transform, download=False)
    except RuntimeError as err:  # torchvision's checksum failure
        raise DatasetNotFoundError(
            f"{name} files in '{root}' failed torchvision's integrity check ({err}); "
            f"replace them with {_SOURCES[name]}"
        ) from err
    return DatasetSplits(
        name=name,
        train=IndexedDataset(train),
        test=test,
        num_classes=100 if name == "cifar100" else 10,
        sample_shape=(3, 32, 32),
        synthetic=False,
        augment=augment,
    )


def load_dataset(
    name: DatasetName,
    *,
    data_dir: str | Path = "data",
    split_seed: int = 0,
    augment: bool = False,
) -> DatasetSplits:
    """Load a dataset by name, never downloading.

    Args:
        name: ``"digits"`` (embedded), ``"fake-cifar"`` (random, speed checks only),
            ``"cifar10"``, ``"cifar100"`` or ``"svhn"`` (read from ``data_dir``).
        data_dir: Folder holding the local datasets (default: ``"data"``).
        split_seed: Seed of the digits train/test split and of the fake-cifar tensors
            (default: 0).
        augment: Random crop (and flip, except for SVHN) on the local datasets' training sets
            (default: False). With augmentation a stored example is another view of the image;
            storing perturbations (``mode="perturbation"``) replays them on the current view.

    Returns:
        The train/test splits.

    Raises:
        ValueError: If ``name`` is unknown, or ``augment`` is asked of digits or fake-cifar.
        DatasetNotFoundError: If a local dataset's files are missing.

    Example:
        >>> load_dataset("digits").num_classes
        10
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    if augment and name in ("digits", "fake-cifar"):
        raise ValueError(f"augment is only available for cifar10, cifar100 and svhn, not {name!r}")
    if name == "digits":
        return load_digits(split_seed=split_seed)
    if name == "fake-cifar":
        return load_fake_cifar(seed=split_seed)
    return _load_local(name, Path(data_dir), augment=augment)
