"""Views of a padded frame: the crop-and-flip augmentation and its inverse, as pure functions.

A batch augmentation that crops each image of a padded frame at an offset and mirrors it reports
``offsets`` (``(B, 2)`` int64 top-left corners) and ``flips`` (``(B,)`` bool). A memory aligned
with it (``MemoryWrapper(..., view_padding=p)``) stores each example in the padded frame through
:func:`uncrop_flip` and reads it back under the current view with :func:`crop_flip`, so that last
epoch's example is replayed on the same pixels of the image rather than shifted.

Example:
    >>> frame = torch.arange(9.0).view(1, 1, 3, 3)
    >>> offsets, flips = torch.tensor([[1, 1]]), torch.tensor([False])
    >>> view = crop_flip(frame, offsets, flips, (2, 2))
    >>> torch.equal(uncrop_flip(view, offsets, flips, into=frame), frame)
    True
"""

from __future__ import annotations

import torch

__all__ = ["crop_flip", "uncrop_flip"]


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
