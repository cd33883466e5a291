"""Checks of the arguments of a memory call, done before anything is read, run or stored.

Indices are checked on the host: on CUDA an out-of-range index is a device-side assert that leaves
the CUDA context unusable, and plain indexing wraps negative indices around silently.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["check_batch", "check_indices"]

_SHOWN = 5  # how many offending values a message quotes


def check_indices(indices: object, *, batch_size: int, num_samples: int) -> torch.Tensor:
    """Returns ``indices`` as a 1-D int64 CPU tensor after checking type, shape and range.

    Args:
        indices: dataset indices of the batch: an integer tensor, NumPy array or sequence of ints.
        batch_size: the batch size they must match.
        num_samples: indices must lie in ``[0, num_samples)``.

    Raises:
        TypeError: not integers (floats, bools, uint8 masks, other objects).
        ValueError: not 1-D, or not ``batch_size`` long.
        IndexError: negative or ``>= num_samples``.

    Example:
        >>> check_indices([3, 0], batch_size=2, num_samples=4)
        tensor([3, 0])
    """
    tensor = _as_tensor(indices)
    if tensor.dtype in (torch.bool, torch.uint8):
        raise TypeError(
            f"indices must be signed integers, got dtype {tensor.dtype} "
            "(torch reads bool and uint8 index tensors as masks)"
        )
    if tensor.is_floating_point() or tensor.is_complex():
        raise TypeError(f"indices must be integers, got dtype {tensor.dtype}")
    if tensor.dim() != 1:
        raise ValueError(f"indices must be 1-D, got shape {tuple(tensor.shape)}")
    if tensor.shape[0] != batch_size:
        raise ValueError(
            f"indices has {tensor.shape[0]} entries but the batch has {batch_size} samples"
        )
    tensor = tensor.to("cpu", torch.int64)
    bad = tensor[(tensor < 0) | (tensor >= num_samples)]
    if bad.numel():
        raise IndexError(
            f"indices must lie in [0, {num_samples}), got {bad[:_SHOWN].tolist()}"
            + (f" and {bad.numel() - _SHOWN} more" if bad.numel() > _SHOWN else "")
        )
    return tensor


def _as_tensor(indices: object) -> torch.Tensor:
    if isinstance(indices, torch.Tensor):
        return indices.detach()
    if isinstance(indices, np.ndarray):
        if indices.dtype.kind not in "iu":
            raise TypeError(f"indices must be integers, got a NumPy array of dtype {indices.dtype}")
        return torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int64))
    if isinstance(indices, Sequence) and not isinstance(indices, (str, bytes)):
        wrong = [v for v in indices if isinstance(v, bool) or not isinstance(v, (int, np.integer))]
        if wrong:
            raise TypeError(f"indices must be integers, got {wrong[:_SHOWN]!r}")
        return torch.tensor([int(v) for v in indices], dtype=torch.int64)
    raise TypeError(
        f"indices must be an integer tensor, array or sequence, got {type(indices).__name__}"
    )


def check_batch(
    *,
    clean: torch.Tensor,
    adv: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
    sample_shape: tuple[int, ...],
) -> None:
    """Checks the tensors of a memory call against each other and the memory's sample shape.

    Raises:
        TypeError: an argument is not a tensor, inputs are not floating point, targets not integer.
        ValueError: shapes, batch sizes or devices disagree, or target values are out of range.

    Example:
        >>> x = torch.zeros(2, 1, 4)
        >>> check_batch(clean=x, adv=x, logits=torch.zeros(2, 3), targets=torch.tensor([0, 2]),
        ...             sample_shape=(1, 4))
    """
    named = {"clean": clean, "adv": adv, "logits": logits, "targets": targets}
    for name, value in named.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    for name in ("clean", "adv", "logits"):
        if not named[name].is_floating_point():
            raise TypeError(f"{name} must be floating point, got dtype {named[name].dtype}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must hold integer class labels, got dtype {targets.dtype}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (batch, classes), got shape {tuple(logits.shape)}")
    if targets.dim() != 1:
        raise ValueError(f"targets must be 1-D, got shape {tuple(targets.shape)}")
    expected = (clean.shape[0], *sample_shape) if clean.dim() else None
    if tuple(clean.shape) != expected:
        raise ValueError(
            f"clean has shape {tuple(clean.shape)}, expected (batch, *{tuple(sample_shape)})"
        )
    if adv.shape != clean.shape:
        raise ValueError(
            f"adv has shape {tuple(adv.shape)} but clean has {tuple(clean.shape)}; both must be "
            f"(batch, *{tuple(sample_shape)})"
        )
    sizes = {name: int(value.shape[0]) for name, value in named.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"batch sizes differ: {sizes}")
    devices = {name: str(value.device) for name, value in named.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"clean, adv, logits and targets must be on one device, got {devices}")
    # Only CPU targets are range-checked here: on CUDA that would cost a host sync, and a bad label
    # has already failed the caller's own cross-entropy on the same targets.
    if targets.device.type == "cpu" and targets.numel():
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or high >= logits.shape[1]:
            raise ValueError(
                f"targets must lie in [0, {logits.shape[1]}) for logits with {logits.shape[1]} "
                f"classes, got values from {low} to {high}"
            )
