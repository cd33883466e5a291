"""Device-resident data: crop and flip in batches, their inverse, exactly (checked on the CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memloss_addon.experiments.gpu_data import (
    DeviceDataset,
    covered_mask,
    crop_flip,
    pad_images,
    random_augmentation,
    synthetic_cifar,
    uncrop_flip,
)
from tests.conftest import requires_cuda

SIZE = (32, 32)


def naive_crop_flip(padded, offsets, flips, size):
    """One sample at a time, with slicing: what torchvision's RandomCrop then
    RandomHorizontalFlip do to a padded image."""
    views = []
    for frame, (row, col), flip in zip(padded, offsets.tolist(), flips.tolist(), strict=True):
        view = frame[:, row : row + size[0], col : col + size[1]]
        views.append(view.flip(-1) if flip else view)
    return torch.stack(views)


def draw(batch, padding=4, seed=0):
    return random_augmentation(
        batch, padding=padding, generator=torch.Generator().manual_seed(seed)
    )


def test_crop_flip_equals_slicing_sample_by_sample():
    images, _ = synthetic_cifar(64, seed=1)
    padded = pad_images(images, 4)
    offsets, flips = draw(64)
    assert bool(flips.any()) and not bool(flips.all())
    assert torch.equal(
        crop_flip(padded, offsets, flips, SIZE), naive_crop_flip(padded, offsets, flips, SIZE)
    )
    floats = padded.float() / 255
    assert torch.equal(
        crop_flip(floats, offsets, flips, SIZE), naive_crop_flip(floats, offsets, flips, SIZE)
    )


def test_every_offset_and_flip_is_exact():
    frame = torch.arange(2 * 6 * 7).view(1, 2, 6, 7).repeat(2 * 4 * 3, 1, 1, 1)
    grid = [(r, c, f) for r in range(4) for c in range(3) for f in (False, True)]
    offsets = torch.tensor([[r, c] for r, c, _ in grid])
    flips = torch.tensor([f for _, _, f in grid])
    views = crop_flip(frame, offsets, flips, (3, 5))
    assert torch.equal(views, naive_crop_flip(frame, offsets, flips, (3, 5)))
    back = uncrop_flip(views, offsets, flips, into=torch.full_like(frame, -1))
    mask = covered_mask(offsets, (6, 7), (3, 5)).expand_as(frame)
    assert torch.equal(back[mask], frame[mask])
    assert bool((back[~mask] == -1).all())


def test_uncrop_flip_inverts_crop_flip_on_the_covered_region():
    images, _ = synthetic_cifar(32, seed=2)
    padded = pad_images(images, 4).float() / 255
    offsets, flips = draw(32, seed=3)
    views = crop_flip(padded, offsets, flips, SIZE)
    # view -> frame -> view is the identity, whatever the frame holds elsewhere
    other = torch.rand_like(padded)
    assert torch.equal(
        crop_flip(uncrop_flip(views, offsets, flips, into=other), offsets, flips, SIZE), views
    )
    # frame -> view -> frame is the identity
    assert torch.equal(uncrop_flip(views, offsets, flips, into=padded), padded)
    # only the covered region is written; `into` itself is left alone
    before = other.clone()
    written = uncrop_flip(views + 1, offsets, flips, into=other)
    mask = covered_mask(offsets, padded.shape[-2:], SIZE).expand_as(padded)
    assert torch.equal(written[~mask], other[~mask]) and torch.equal(other, before)
    assert int(mask[:, 0].sum()) == 32 * 32 * 32


def test_a_stored_row_read_back_under_a_new_crop_is_that_crop_of_the_padded_example():
    """The aligned memory's contract (issue 16, part 4): an adversarial view stored in the padded
    frame, read back under the next epoch's crop and flip, is that crop of the padded example:
    the stored perturbation where the two views overlap, the clean image elsewhere."""
    images, _ = synthetic_cifar(16, seed=4)
    clean = pad_images(images, 4).float() / 255
    offsets1, flips1 = draw(16, seed=5)
    offsets2, flips2 = draw(16, seed=6)
    adv_view = (crop_flip(clean, offsets1, flips1, SIZE) + 8 / 255).clamp(0, 1)
    stored = uncrop_flip(adv_view, offsets1, flips1, into=clean)
    read = crop_flip(stored, offsets2, flips2, SIZE)
    assert torch.equal(read, naive_crop_flip(stored, offsets2, flips2, SIZE))
    overlap = crop_flip(covered_mask(offsets1, clean.shape[-2:], SIZE), offsets2, flips2, SIZE)
    overlap = overlap.expand_as(read)
    clean_view = crop_flip(clean, offsets2, flips2, SIZE)
    shifted = crop_flip(
        uncrop_flip(adv_view, offsets1, flips1, into=torch.zeros_like(clean)),
        offsets2,
        flips2,
        SIZE,
    )
    assert torch.equal(read[~overlap], clean_view[~overlap])
    assert torch.equal(read[overlap], shifted[overlap])
    # the same crop and flip again gives the stored example back exactly
    assert torch.equal(crop_flip(stored, offsets1, flips1, SIZE), adv_view)


def test_padding_modes_match_numpy():
    images, _ = synthetic_cifar(3, seed=7)
    array = images.numpy()
    for mode, numpy_mode in (("zeros", "constant"), ("reflect", "reflect")):
        expected = np.pad(array, [(0, 0), (0, 0), (4, 4), (4, 4)], mode=numpy_mode)
        padded = pad_images(images, 4, mode)  # type: ignore[arg-type]
        assert padded.dtype == torch.uint8
        assert np.array_equal(padded.numpy(), expected)
    assert torch.equal(pad_images(images, 0), images)


def test_bad_geometry_is_refused():
    padded = torch.zeros(2, 3, 40, 40)
    offsets = torch.tensor([[0, 0], [9, 0]])
    flips = torch.zeros(2, dtype=torch.bool)
    with pytest.raises(ValueError, match="offsets must lie"):
        crop_flip(padded, offsets, flips, SIZE)
    with pytest.raises(ValueError, match="int64"):
        crop_flip(padded, offsets.int(), flips, SIZE)
    with pytest.raises(ValueError, match="bool"):
        crop_flip(padded, offsets.clamp(max=8), flips.int(), SIZE)
    with pytest.raises(ValueError, match="does not fit"):
        crop_flip(padded, offsets.clamp(max=8), flips, (41, 32))
    with pytest.raises(ValueError, match="share batch"):
        uncrop_flip(torch.zeros(1, 3, 32, 32), offsets, flips, into=padded)
    with pytest.raises(ValueError, match="non-negative"):
        pad_images(torch.zeros(1, 1, 4, 4), -1)


def test_an_epoch_visits_every_sample_once_and_reports_its_augmentation():
    images, labels = synthetic_cifar(50, seed=8)
    data = DeviceDataset(images, labels, padding=4)
    generator = torch.Generator().manual_seed(0)
    seen = []
    for batch in data.batches(16, generator=generator):
        seen.append(batch.idx)
        assert torch.equal(batch.y, labels[batch.idx])
        expected = naive_crop_flip(
            pad_images(images[batch.idx], 4), batch.offsets, batch.flips, SIZE
        )
        assert torch.equal(batch.x, expected.float() / 255)
        assert bool(((batch.offsets >= 0) & (batch.offsets <= 8)).all())
    assert sorted(torch.cat(seen).tolist()) == list(range(50))
    assert [len(i) for i in seen] == [16, 16, 16, 2]
    assert [len(b.idx) for b in data.batches(16, drop_last=True)] == [16, 16, 16]


def test_batches_are_reproducible_from_a_generator():
    images, labels = synthetic_cifar(20)
    data = DeviceDataset(images, labels)
    first = list(data.batches(8, generator=torch.Generator().manual_seed(3)))
    again = list(data.batches(8, generator=torch.Generator().manual_seed(3)))
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a.x, b.x) and torch.equal(a.offsets, b.offsets)


def test_without_augmentation_the_images_come_back_unchanged():
    images, labels = synthetic_cifar(10)
    data = DeviceDataset(images, labels, augment=False)
    batch = next(iter(data.batches(10, shuffle=False)))
    assert torch.equal(batch.x, images.float() / 255)
    assert torch.equal(batch.idx, torch.arange(10))
    assert not bool(batch.flips.any()) and bool((batch.offsets == 4).all())


def test_layouts_dtypes_and_memory_format():
    images, labels = synthetic_cifar(6)
    nhwc = images.permute(0, 2, 3, 1).numpy()
    data = DeviceDataset(
        nhwc, labels.numpy(), layout="NHWC", augment=False, channels_last=True, dtype=torch.float64
    )
    batch = next(iter(data.batches(6, shuffle=False)))
    assert batch.x.dtype == torch.float64
    assert batch.x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch.x, images.double() / 255)
    assert data.sample_shape == (3, 32, 32) and len(data) == 6
    with pytest.raises(ValueError, match="uint8"):
        DeviceDataset(images.long(), labels)
    # Floating images (synthetic data) are kept as they are, not divided by 255.
    floats = DeviceDataset(images.float() / 255, labels, augment=False, padding=0)
    assert torch.equal(next(iter(floats.batches(6, shuffle=False))).x, images.float() / 255)
    with pytest.raises(ValueError, match="labels"):
        DeviceDataset(images, labels[:3])


def test_synthetic_cifar_is_seeded():
    a, la = synthetic_cifar(5, seed=1)
    b, lb = synthetic_cifar(5, seed=1)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, synthetic_cifar(5, seed=2)[0])


@requires_cuda
def test_on_cuda_nothing_leaves_the_device():
    images, labels = synthetic_cifar(64)
    data = DeviceDataset(images, labels, device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)
    for batch in data.batches(32, generator=generator):
        for tensor in (batch.x, batch.y, batch.idx, batch.offsets, batch.flips):
            assert tensor.is_cuda
        cpu = naive_crop_flip(
            pad_images(images[batch.idx.cpu()], 4), batch.offsets.cpu(), batch.flips.cpu(), SIZE
        )
        assert torch.equal(batch.x.cpu(), cpu.float() / 255)
