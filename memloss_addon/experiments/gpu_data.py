"""A training set held on the device as one uint8 tensor, cropped and flipped there in batches.

No DataLoader, no workers, no host copies per step: the images are padded once, stored as uint8
on the device (CIFAR-10 padded by 4: 50,000 x 3 x 40 x 40 bytes, 240 MB), and each batch is cut
out of that padded frame by one gather. Every batch reports, per sample, where its crop lies in
the padded frame (``offsets``) and whether it was mirrored (``flips``), so that a memory can keep
its examples in the padded frame and show each epoch's view of them (ATTA, Zheng et al. CVPR
2020):

- :func:`crop_flip` (padded frame -> view) is the augmentation itself;
- :func:`uncrop_flip` (view -> padded frame) is its inverse on the covered region: it writes a
  view back into a padded-frame tensor and leaves every pixel the view does not cover as it was.

Both are pure functions of tensors, exact (indexing only, no arithmetic on the values), and
``crop_flip(uncrop_flip(v, o, f, into=P), o, f) == v`` for every ``P``.

Conventions: ``offsets`` is ``(B, 2)`` int64, ``(row, column)`` of the crop's top-left corner in
the padded frame, each in ``[0, 2 * padding]``; ``flips`` is ``(B,)`` bool, ``True`` for a
horizontal mirror applied *after* the crop (torchvision's ``RandomCrop`` then
``RandomHorizontalFlip``, as TRADES, MART and HAT train). Padding is zeros (torchvision's
``RandomCrop(32, padding=4)``) or ``"reflect"`` (robust_overfitting ``utils.py`` ``pad``).

Example:
    >>> images, labels = synthetic_cifar(8, seed=0)
    >>> data = DeviceDataset(images, labels, padding=4)
    >>> batch = next(iter(data.batches(4, generator=torch.Generator().manual_seed(0))))
    >>> batch.x.shape, batch.x.dtype, batch.offsets.shape, batch.flips.dtype
    (torch.Size([4, 3, 32, 32]), torch.float32, torch.Size([4, 2]), torch.bool)
    >>> padded = data.padded_float(batch.idx)
    >>> torch.equal(crop_flip(padded, batch.offsets, batch.flips, (32, 32)), batch.x)
    True
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

from memloss_addon.experiments.names import PadMode
from memloss_addon.views import crop_flip, uncrop_flip

__all__ = [
    "AugmentedBatch",
    "DeviceDataset",
    "PadMode",
    "augment_batch",
    "covered_mask",
    "crop_flip",
    "dataset_tensors",
    "pad_images",
    "random_augmentation",
    "synthetic_cifar",
    "uncrop_flip",
]


def pad_images(images: torch.Tensor, padding: int, mode: PadMode = "zeros") -> torch.Tensor:
    """Pad ``(N, C, H, W)`` images by ``padding`` pixels on each side, in their own dtype.

    Args:
        images: A batch of images, any dtype (uint8 included).
        padding: Pixels added on every side (0: unchanged).
        mode: ``"zeros"`` (torchvision's ``RandomCrop(padding=...)``) or ``"reflect"`` (mirror
            without repeating the edge, NumPy's ``mode='reflect'`` as robust_overfitting uses).

    Raises:
        ValueError: A negative padding, an unknown mode, or not a 4-D tensor.

    Example:
        >>> pad_images(torch.arange(6, dtype=torch.uint8).view(1, 1, 2, 3), 1, "reflect")[0, 0]
        tensor([[4, 3, 4, 5, 4],
                [1, 0, 1, 2, 1],
                [4, 3, 4, 5, 4],
                [1, 0, 1, 2, 1]], dtype=torch.uint8)
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be a non-negative int, got {padding!r}")
    if mode not in ("zeros", "reflect"):
        raise ValueError(f"mode must be 'zeros' or 'reflect', got {mode!r}")
    if padding == 0:
        return images.clone()
    if mode == "zeros":
        return F.pad(images, (padding,) * 4)
    # Reflect padding as index arithmetic: exact for every dtype (uint8 included).
    height, width = images.shape[-2:]
    if padding >= min(height, width):
        raise ValueError(f"reflect padding {padding} needs images larger than {padding} pixels")
    rows = _reflect_index(height, padding, images.device)
    cols = _reflect_index(width, padding, images.device)
    return images[:, :, rows[:, None], cols[None, :]]


def _reflect_index(size: int, padding: int, device: torch.device) -> torch.Tensor:
    index = torch.arange(-padding, size + padding, device=device).abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)


def covered_mask(
    offsets: torch.Tensor, padded_size: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """``(B, 1, Hp, Wp)`` bool: the padded-frame pixels a ``size`` view at ``offsets`` covers.

    (A mirror changes which view pixel lands where, not which pixels are covered.)

    Example:
        >>> covered_mask(torch.tensor([[0, 1]]), (3, 3), (2, 2))[0, 0].int()
        tensor([[0, 1, 1],
                [0, 1, 1],
                [0, 0, 0]], dtype=torch.int32)
    """
    device = offsets.device
    rows = torch.arange(padded_size[0], device=device)[None, :] - offsets[:, :1]
    cols = torch.arange(padded_size[1], device=device)[None, :] - offsets[:, 1:]
    inside_rows = (rows >= 0) & (rows < size[0])
    inside_cols = (cols >= 0) & (cols < size[1])
    return (inside_rows[:, :, None] & inside_cols[:, None, :]).unsqueeze(1)


def random_augmentation(
    batch: int,
    *,
    padding: int,
    flip: bool = True,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``(offsets, flips)`` for ``batch`` samples on ``device``: offsets uniform in
    ``[0, 2 * padding]`` per axis (torchvision's ``RandomCrop``), flips with probability 1/2.

    Draws from ``generator`` (which must live on ``device``) or the device's global RNG, never
    synchronising with the host.

    Example:
        >>> offsets, flips = random_augmentation(3, padding=4, generator=torch.Generator())
        >>> offsets.shape, bool(((offsets >= 0) & (offsets <= 8)).all()), flips.shape
        (torch.Size([3, 2]), True, torch.Size([3]))
    """
    offsets = torch.randint(
        0, 2 * padding + 1, (batch, 2), device=device, generator=generator, dtype=torch.int64
    )
    if flip:
        flips = torch.rand(batch, device=device, generator=generator) < 0.5
    else:
        flips = torch.zeros(batch, dtype=torch.bool, device=device)
    return offsets, flips


def augment_batch(
    x: torch.Tensor,
    *,
    padding: int,
    pad_mode: PadMode = "zeros",
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random crop and flip of a batch already on its device: pad, draw, cut.

    The same draws (:func:`random_augmentation` from ``generator``) and the same pixels as a
    :class:`DeviceDataset` holding these images gives, for batches that are not held there.

    Returns:
        ``(views, offsets, flips)``: views of ``x``'s shape and dtype, and how they were cut.

    Example:
        >>> x = torch.rand(2, 3, 8, 8)
        >>> views, offsets, flips = augment_batch(x, padding=2, generator=torch.Generator())
        >>> views.shape == x.shape, offsets.shape
        (True, torch.Size([2, 2]))
    """
    offsets, flips = random_augmentation(
        int(x.shape[0]), padding=padding, flip=flip, device=x.device, generator=generator
    )
    padded = pad_images(x, padding, pad_mode)
    return crop_flip(padded, offsets, flips, (int(x.shape[2]), int(x.shape[3]))), offsets, flips


def dataset_tensors(dataset: Dataset[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """All images and labels of a map-style dataset of ``(x, y, ...)`` items, as two tensors.

    Reads the bytes without decoding item by item where it can: torchvision's ``CIFAR10``,
    ``CIFAR100`` (NHWC) and ``SVHN`` (NCHW) with a plain ``ToTensor`` transform give their uint8
    ``data`` (what ``ToTensor`` would divide by 255); a ``TensorDataset`` gives its tensors;
    ``Subset`` and :class:`~memloss_addon.data.IndexedDataset` wrappers are looked through.
    Anything else is read item by item and stacked (floats as they come).

    Returns:
        ``(images, labels)``: ``(N, C, H, W)`` (uint8 or the items' float dtype) and ``(N,)``
        int64.

    Example:
        >>> data = TensorDataset(torch.rand(5, 1, 4, 4), torch.arange(5))
        >>> images, labels = dataset_tensors(Subset(data, [4, 0]))
        >>> images.shape, labels.tolist()
        (torch.Size([2, 1, 4, 4]), [4, 0])
    """
    from memloss_addon.data import IndexedDataset

    if isinstance(dataset, IndexedDataset):
        return dataset_tensors(dataset.dataset)
    if isinstance(dataset, Subset):
        images, labels = dataset_tensors(dataset.dataset)
        index = torch.as_tensor(list(dataset.indices), dtype=torch.int64)
        return images[index], labels[index]
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[0], dataset.tensors[1].to(torch.int64)
    raw = _torchvision_bytes(dataset)
    if raw is not None:
        return raw
    items = [dataset[i] for i in range(len(dataset))]  # type: ignore[arg-type]
    images = torch.stack([torch.as_tensor(item[0]) for item in items])
    labels = torch.as_tensor([int(item[1]) for item in items], dtype=torch.int64)
    return images, labels


def _torchvision_bytes(dataset: Dataset[Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    name = type(dataset).__name__
    transform = getattr(dataset, "transform", None)
    if name not in ("CIFAR10", "CIFAR100", "SVHN") or type(transform).__name__ != "ToTensor":
        return None
    if getattr(dataset, "target_transform", None) is not None:
        return None
    data = getattr(dataset, "data", None)
    labels = getattr(dataset, "labels" if name == "SVHN" else "targets", None)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or labels is None:
        return None
    images = torch.from_numpy(data)
    if name != "SVHN":  # CIFAR keeps (N, H, W, C)
        images = images.permute(0, 3, 1, 2)
    return images.contiguous(), torch.as_tensor(np.asarray(labels), dtype=torch.int64)


@dataclass(frozen=True)
class AugmentedBatch:
    """One training batch and how it was augmented.

    Attributes:
        x: ``(B, C, H, W)`` float images in ``[0, 1]`` (the views).
        y: ``(B,)`` int64 labels.
        idx: ``(B,)`` int64 dataset indices (for the memory).
        offsets: ``(B, 2)`` int64 crop corners in the padded frame.
        flips: ``(B,)`` bool mirrors.
    """

    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor
    offsets: torch.Tensor
    flips: torch.Tensor


class DeviceDataset:
    """Images and labels on one device, padded once, augmented per batch without workers.

    Args:
        images: ``(N, C, H, W)`` uint8 tensor or array (``layout="NHWC"`` for ``(N, H, W, C)``,
            e.g. torchvision's ``CIFAR10.data``), divided by 255 per batch; or floating images
            in ``[0, 1]``, kept in their dtype and given as they are (synthetic data).
        labels: ``(N,)`` integer labels.
        device: Where the data live and batches are made (default: ``"cpu"``).
        padding: Crop padding per side (default: 4; 0 with ``augment=False`` stores no frame).
        pad_mode: ``"zeros"`` (default) or ``"reflect"``.
        augment: Random crops and flips (default: ``True``); ``False`` returns the images
            unchanged, with offsets ``(padding, padding)`` and no flips.
        flip: Random horizontal mirrors when augmenting (default: ``True``).
        layout: ``"NCHW"`` (default) or ``"NHWC"``.
        dtype: Float dtype of the batches' ``x`` (default: ``torch.float32``).
        channels_last: Return ``x`` in ``torch.channels_last`` memory format.

    Raises:
        ValueError: Images that are not uint8 or floating or not 4-D, labels of another length.

    Example:
        >>> images, labels = synthetic_cifar(6)
        >>> data = DeviceDataset(images, labels, augment=False)
        >>> batch = next(iter(data.batches(6, shuffle=False)))
        >>> torch.equal(batch.x, images.float() / 255), batch.offsets[0].tolist()
        (True, [4, 4])
    """

    def __init__(
        self,
        images: torch.Tensor | np.ndarray,
        labels: torch.Tensor | np.ndarray | list[int],
        *,
        device: torch.device | str = "cpu",
        padding: int = 4,
        pad_mode: PadMode = "zeros",
        augment: bool = True,
        flip: bool = True,
        layout: Literal["NCHW", "NHWC"] = "NCHW",
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
    ) -> None:
        x = torch.as_tensor(images)
        if not (x.dtype == torch.uint8 or x.is_floating_point()) or x.dim() != 4:
            raise ValueError(f"images must be 4-D uint8 or float, got {x.dtype} {tuple(x.shape)}")
        if layout == "NHWC":
            x = x.permute(0, 3, 1, 2)
        elif layout != "NCHW":
            raise ValueError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
        y = torch.as_tensor(labels, dtype=torch.int64)
        if y.shape != (x.shape[0],):
            raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(y.shape)}")
        self.device = torch.device(device)
        self.size = (int(x.shape[2]), int(x.shape[3]))
        self.padding = padding
        self.augment = augment
        self.flip = flip
        self.dtype = dtype
        self.channels_last = channels_last
        self.padded = pad_images(x.contiguous(), padding, pad_mode).to(self.device)
        self.labels = y.to(self.device)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one view."""
        return (int(self.padded.shape[1]), *self.size)

    @property
    def nbytes(self) -> int:
        """Bytes the padded images and the labels take on the device."""
        return self.padded.nbytes + self.labels.nbytes

    def _scale(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            return images.to(self.dtype).div_(255)
        return images.to(self.dtype)

    def _to_float(self, images: torch.Tensor) -> torch.Tensor:
        out = self._scale(images)
        if self.channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def padded_float(self, idx: torch.Tensor) -> torch.Tensor:
        """The samples' padded frames as floats in ``[0, 1]`` (e.g. to fill a memory's rows)."""
        return self._scale(self.padded[idx.to(self.device)])

    def view(self, idx: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """The samples' views under given ``offsets`` and ``flips``, floats in ``[0, 1]``."""
        frames = self.padded[idx.to(self.device)]
        return self._to_float(crop_flip(frames, offsets, flips, self.size))

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        generator: torch.Generator | None = None,
        order: torch.Tensor | None = None,
    ) -> Iterator[AugmentedBatch]:
        """One epoch of batches: a permutation (or the order) cut into ``batch_size`` pieces.

        Args:
            batch_size: Samples per batch (the last one may be smaller).
            shuffle: Random order (default: ``True``).
            drop_last: Leave out a last, smaller batch (the memory then misses its samples).
            generator: Source of the order and the augmentation; must live on the dataset's
                device (default: the device's global RNG).
            order: The epoch's sample indices in their order, drawn elsewhere (e.g. by a
                DataLoader's generator on the CPU; any 1-D selection); moved to the device once.
                Given, ``shuffle`` is ignored and ``generator`` serves the augmentation only.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        n = len(self)
        if order is not None:
            if order.dim() != 1:
                raise ValueError(f"order must be 1-D indices, got shape {tuple(order.shape)}")
            order = order.to(self.device, torch.int64, non_blocking=True)
            n = int(order.shape[0])
        elif shuffle:
            order = torch.randperm(n, device=self.device, generator=generator)
        else:
            order = torch.arange(n, device=self.device)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            count = int(idx.shape[0])
            if self.augment:
                offsets, flips = random_augmentation(
                    count,
                    padding=self.padding,
                    flip=self.flip,
                    device=self.device,
                    generator=generator,
                )
            else:
                offsets = torch.full(
                    (count, 2), self.padding, dtype=torch.int64, device=self.device
                )
                flips = torch.zeros(count, dtype=torch.bool, device=self.device)
            yield AugmentedBatch(
                x=self.view(idx, offsets, flips),
                y=self.labels[idx],
                idx=idx,
                offsets=offsets,
                flips=flips,
            )


def synthetic_cifar(
    num_samples: int,
    *,
    num_classes: int = 10,
    seed: int = 0,
    shape: tuple[int, int, int] = (3, 32, 32),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded CIFAR-shaped uint8 images whose class shows: half a class prototype, half noise.

    For tests and timing only: a model can fit the training set, accuracies mean nothing.

    Returns:
        ``(images, labels)``: ``(N, C, H, W)`` uint8 and ``(N,)`` int64.

    Example:
        >>> images, labels = synthetic_cifar(4, seed=1)
        >>> images.shape, images.dtype, labels.tolist() == synthetic_cifar(4, seed=1)[1].tolist()
        (torch.Size([4, 3, 32, 32]), torch.uint8, True)
    """
    if num_samples < 1 or num_classes < 2:
        raise ValueError(
            f"need num_samples >= 1 and num_classes >= 2, got {num_samples}, {num_classes}"
        )
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.randint(0, 256, (num_classes, *shape), generator=generator)
    labels = torch.randint(0, num_classes, (num_samples,), generator=generator)
    noise = torch.randint(0, 256, (num_samples, *shape), generator=generator)
    images = (prototypes[labels] + noise) // 2
    return images.to(torch.uint8), labels
