"""Argument checks for the whole package, with one policy for the errors they raise.

- ``TypeError``: the value has the wrong type (a float where an int is needed, a bool where a
  number is needed, a list where a tensor is needed).
- ``ValueError``: the type is right but the value is not (out of its range, not finite, not one of
  the choices, a shape that does not fit).
- ``IndexError``: a dataset index outside ``[0, num_samples)``.

Every message names the argument and quotes the bad value. Checks run before anything is read,
run or stored, so a refused call changes nothing.

Indices are checked on the host: on CUDA an out-of-range index is a device-side assert that leaves
the CUDA context unusable, and plain indexing wraps negative indices around silently.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real
from typing import TypeVar

import numpy as np
import torch

__all__ = [
    "check_batch",
    "check_choice",
    "check_indices",
    "check_shape",
    "finite_number",
    "positive_int",
]

_SHOWN = 5  # how many offending values a message quotes
_Choice = TypeVar("_Choice")


def positive_int(name: str, value: object, *, minimum: int = 1) -> int:
    """Returns ``value`` after checking it is an ``int`` (not a bool) ``>= minimum``.

    Raises:
        TypeError: not an int.
        ValueError: below ``minimum``.

    Example:
        >>> positive_int("depth", 2)
        2
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def finite_number(name: str, value: object, *, positive: bool = False) -> float:
    """Returns ``value`` as a float after checking it is a finite real ``>= 0`` (``> 0``).

    Raises:
        TypeError: not a real number (``bool`` included).
        ValueError: negative (or zero with ``positive``), infinite or NaN.

    Example:
        >>> finite_number("beta", 6)
        6.0
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return number


def check_choice(name: str, value: _Choice, choices: tuple[_Choice, ...]) -> _Choice:
    """Returns ``value`` after checking it is one of ``choices`` (see :mod:`memloss_addon.options`).

    Raises:
        ValueError: not one of the choices.

    Example:
        >>> check_choice("weighting", "none", ("difficulty", "none"))
        'none'
    """
    if value not in choices:
        names = [repr(choice) for choice in choices]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
        raise ValueError(f"{name} must be {listed}, got {value!r}")
    return value


def check_shape(name: str, value: object) -> tuple[int, ...]:
    """Returns ``value`` as a tuple of positive ints (a single int is a 1-D shape).

    Raises:
        TypeError: not an int or a non-empty tuple, list or ``torch.Size``.
        ValueError: an entry is not a positive int.

    Example:
        >>> check_shape("sample_shape", [3, 32, 32])
        (3, 32, 32)
    """
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (tuple, list, torch.Size)) or not value:
        raise TypeError(f"{name} must be a non-empty tuple of ints, got {value!r}")
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
        raise ValueError(f"{name} must hold positive ints, got {tuple(value)!r}")
    return tuple(value)


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
    values = tensor.numpy()  # NumPy: two reductions cost a fraction of torch's per-op overhead
    if values.size and (values.min() < 0 or values.max() >= num_samples):
        bad = values[(values < 0) | (values >= num_samples)]
        raise IndexError(
            f"indices must lie in [0, {num_samples}), got {bad[:_SHOWN].tolist()}"
            + (f" and {bad.size - _SHOWN} more" if bad.size > _SHOWN else "")
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
    batch = clean.shape[0] if clean.dim() else -1
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
    if logits.shape[0] != batch or targets.shape[0] != batch:
        sizes = {name: int(value.shape[0]) for name, value in named.items()}
        raise ValueError(f"batch sizes differ: {sizes}")
    device = clean.device
    if adv.device != device or logits.device != device or targets.device != device:
        devices = {name: str(value.device) for name, value in named.items()}
        raise ValueError(f"clean, adv, logits and targets must be on one device, got {devices}")
    # Only CPU targets are range-checked here: on CUDA that would cost a host sync, and a bad label
    # has already failed the caller's own cross-entropy on the same targets.
    if targets.device.type == "cpu" and targets.numel():
        values = targets.detach().numpy()
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= logits.shape[1]:
            raise ValueError(
                f"targets must lie in [0, {logits.shape[1]}) for logits with {logits.shape[1]} "
                f"classes, got values from {low} to {high}"
            )
