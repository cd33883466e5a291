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
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "AugmentedBatch",
    "DeviceDataset",
    "PadMode",
    "covered_mask",
    "crop_flip",
    "pad_images",
    "random_augmentation",
    "synthetic_cifar",
    "uncrop_flip",
]

PadMode = Literal["zeros", "reflect"]


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


def _view_index(
    offsets: torch.Tensor, flips: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample batch, row and column indices into the padded frame, shaped to broadcast to
    ``(B, H, W)``: view pixel ``(i, j)`` of sample ``b`` is padded pixel ``(rows[b, i],
    cols[b, j])``."""
    height, width = size
    device = offsets.device
    batch = torch.arange(offsets.shape[0], device=device)[:, None, None]
    rows = offsets[:, :1] + torch.arange(height, device=device)[None, :]
    forward = torch.arange(width, device=device)[None, :]
    cols = offsets[:, 1:] + torch.where(flips[:, None], width - 1 - forward, forward)
    return batch, rows[:, :, None], cols[:, None, :]


def _check_geometry(
    padded_shape: torch.Size, offsets: torch.Tensor, flips: torch.Tensor, size: tuple[int, int]
) -> None:
    if len(padded_shape) != 4:
        raise ValueError(f"the padded frame must be (B, C, H, W), got {tuple(padded_shape)}")
    batch = padded_shape[0]
    if offsets.shape != (batch, 2) or offsets.dtype != torch.int64:
        raise ValueError(
            f"offsets must be int64 of shape ({batch}, 2), got {offsets.dtype} "
            f"{tuple(offsets.shape)}"
        )
    if flips.shape != (batch,) or flips.dtype != torch.bool:
        raise ValueError(
            f"flips must be bool of shape ({batch},), got {flips.dtype} {tuple(flips.shape)}"
        )
    height, width = size
    limits = (padded_shape[2] - height, padded_shape[3] - width)
    if min(limits) < 0:
        raise ValueError(f"a {size} view does not fit a {tuple(padded_shape[2:])} frame")
    # Checking values costs a host synchronisation on an accelerator: only on the CPU.
    if offsets.device.type == "cpu" and batch:
        low, high = int(offsets.min()), offsets.max(dim=0).values.tolist()
        if low < 0 or high[0] > limits[0] or high[1] > limits[1]:
            raise ValueError(f"offsets must lie in [0, {limits[0]}] x [0, {limits[1]}]")


def crop_flip(
    padded: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """The augmentation: sample ``b``'s ``size`` crop at ``offsets[b]``, mirrored if ``flips[b]``.

    Args:
        padded: ``(B, C, Hp, Wp)`` images in the padded frame, any dtype.
        offsets: ``(B, 2)`` int64 top-left corners ``(row, column)``.
        flips: ``(B,)`` bool, mirror left-right after cropping.
        size: ``(H, W)`` of the view.

    Returns:
        ``(B, C, H, W)`` views, contiguous, in ``padded``'s dtype.

    Raises:
        ValueError: Shapes or dtypes that do not fit, or (on the CPU) offsets out of range.

    Example:
        >>> frame = torch.arange(16).view(1, 1, 4, 4)
        >>> crop_flip(frame, torch.tensor([[1, 0]]), torch.tensor([True]), (2, 3))[0, 0]
        tensor([[ 6,  5,  4],
                [10,  9,  8]])
    """
    _check_geometry(padded.shape, offsets, flips, size)
    batch, rows, cols = _view_index(offsets, flips, size)
    return padded[batch, :, rows, cols].permute(0, 3, 1, 2).contiguous()


def uncrop_flip(
    view: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, *, into: torch.Tensor
) -> torch.Tensor:
    """The inverse of :func:`crop_flip` on the region the view covers.

    Returns a copy of ``into`` (the padded frame) in which the pixels that
    ``crop_flip(·, offsets, flips, view.shape[-2:])`` reads are replaced by ``view``'s (unmirrored
    where ``flips``); all other pixels keep ``into``'s values. Hence
    ``crop_flip(uncrop_flip(v, o, f, into=P), o, f, size) == v`` for every ``P``, and
    ``uncrop_flip(crop_flip(P, o, f, size), o, f, into=P) == P``.

    Args:
        view: ``(B, C, H, W)`` views (e.g. adversarial examples made on them).
        offsets: ``(B, 2)`` int64 corners the views were cropped at.
        flips: ``(B,)`` bool, whether they were mirrored.
        into: ``(B, C, Hp, Wp)`` frame supplying the uncovered pixels (e.g. the clean padded
            images, or a memory's previous padded-frame rows). Not modified.

    Returns:
        ``(B, C, Hp, Wp)`` in ``into``'s dtype (``view`` is cast to it).

    Raises:
        ValueError: Shapes or dtypes that do not fit, or (on the CPU) offsets out of range.

    Example:
        >>> frame = torch.zeros(1, 1, 3, 3, dtype=torch.long)
        >>> view = torch.tensor([[[[1, 2]]]])
        >>> uncrop_flip(view, torch.tensor([[2, 1]]), torch.tensor([True]), into=frame)[0, 0]
        tensor([[0, 0, 0],
                [0, 0, 0],
                [0, 2, 1]])
    """
    if view.dim() != 4 or view.shape[:2] != into.shape[:2]:
        raise ValueError(
            f"view {tuple(view.shape)} and frame {tuple(into.shape)} must share batch and channels"
        )
    size = (int(view.shape[2]), int(view.shape[3]))
    _check_geometry(into.shape, offsets, flips, size)
    batch, rows, cols = _view_index(offsets, flips, size)
    out = into.clone()
    out[batch, :, rows, cols] = view.to(into.dtype).permute(0, 2, 3, 1)
    return out


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
            e.g. torchvision's ``CIFAR10.data``).
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
        ValueError: Images that are not uint8 or not 4-D, labels of another length.

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
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"images must be 4-D uint8, got {x.dtype} {tuple(x.shape)}")
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

    def _to_float(self, images: torch.Tensor) -> torch.Tensor:
        out = images.to(self.dtype).div_(255)
        if self.channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def padded_float(self, idx: torch.Tensor) -> torch.Tensor:
        """The samples' padded frames as floats in ``[0, 1]`` (e.g. to fill a memory's rows)."""
        return self.padded[idx.to(self.device)].to(self.dtype).div_(255)

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
    ) -> Iterator[AugmentedBatch]:
        """One epoch of batches: a permutation (or the order) cut into ``batch_size`` pieces.

        Args:
            batch_size: Samples per batch (the last one may be smaller).
            shuffle: Random order (default: ``True``).
            drop_last: Leave out a last, smaller batch (the memory then misses its samples).
            generator: Source of the order and the augmentation; must live on the dataset's
                device (default: the device's global RNG).
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        n = len(self)
        if shuffle:
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
