"""How a memory row is encoded for storage and decoded back into an input.

A codec turns a batch of adversarial examples into the storage dtype and back. It works on the
batch's device (so a compressed memory moves compressed bytes between devices) and never sees
indices, files or ranks.

- ``FloatExampleCodec``: the example itself in float32, float16 or bfloat16.
- ``Uint8ExampleCodec``: the example clamped to [0, 1] and rounded to the 1/255 grid; when ``eps``
  is known it is re-projected into the eps-ball of the current clean input on read.
- ``FloatPerturbationCodec``: ``delta = adv - clean`` in a float dtype, replayed on the current
  clean input as ``clip(clean + delta, 0, 1)``.
- ``Int8PerturbationCodec``: the same delta quantized at ``eps / 127``.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..checks import check_choice, finite_number
from ..options import MODES, STORAGE_DTYPE_NAMES, Mode, StorageDtypeName

__all__ = [
    "STORAGE_DTYPES",
    "Codec",
    "FloatExampleCodec",
    "FloatPerturbationCodec",
    "Int8PerturbationCodec",
    "Uint8ExampleCodec",
    "dtype_name",
    "make_codec",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FAST_SUM_DTYPES = (torch.float32, torch.float64)  # wide enough that a row's sum rarely overflows
# The storage dtypes by the names used in state dicts, files and command lines.
STORAGE_DTYPES: dict[StorageDtypeName, torch.dtype] = {
    name: getattr(torch, name) for name in STORAGE_DTYPE_NAMES
}
SUPPORTED_DTYPES = tuple(STORAGE_DTYPES.values())
_NAMES = {dtype: name for name, dtype in STORAGE_DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The short name used in state dicts and messages (``torch.float16`` -> ``"float16"``).

    Example:
        >>> dtype_name(torch.bfloat16)
        'bfloat16'
    """
    return _NAMES.get(dtype, str(dtype))


class Codec(Protocol):
    """Encodes adversarial examples for storage and decodes them for a forward pass."""

    storage_dtype: torch.dtype

    def encode(self, adv: torch.Tensor, clean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the encoded rows and a ``(B,)`` mask of rows that may be stored."""
        ...

    def decode(self, stored: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        """Returns memory examples in ``clean.dtype`` from stored rows and their clean inputs."""
        ...


def _finite_rows(rows: torch.Tensor, limit: float = float("inf")) -> torch.Tensor:
    """Rows whose values are all finite and within ``[-limit, limit]``.

    On the CPU, a row's sum is finite only if all its values are (NaN and Inf propagate), so one
    pass settles the usual case when ``limit`` is no tighter than the dtype's own range. Otherwise,
    or when some sum is not finite (a finite row may overflow), row-wise max and min decide: they
    propagate NaN and need no temporary copy (on CPU about 15x faster than
    ``isfinite(rows).all(1)``). On a GPU they always decide: asking whether every sum is finite
    would make the host wait for the device, and the write's copy of the mask is the one wait a
    call needs.
    """
    flat = rows.flatten(1)
    largest = _largest(rows.dtype)
    bound = min(limit, largest)
    if rows.device.type == "cpu" and bound >= largest and rows.dtype in FAST_SUM_DTYPES:
        finite = torch.isfinite(flat.sum(dim=1))
        if bool(finite.all()):
            return finite
    return (flat.amax(dim=1) <= bound) & (flat.amin(dim=1) >= -bound)


def _largest(dtype: torch.dtype) -> float:
    """The largest finite value of a float dtype, or infinity for integer storage."""
    return float(torch.finfo(dtype).max) if dtype.is_floating_point else float("inf")


class FloatExampleCodec:
    """Stores the example itself in a float dtype.

    Example:
        >>> codec = FloatExampleCodec(torch.float16)
        >>> stored, ok = codec.encode(torch.tensor([[0.25]]), torch.tensor([[0.0]]))
        >>> stored.dtype, ok.tolist(), codec.decode(stored, torch.zeros(1, 1)).tolist()
        (torch.float16, [True], [[0.25]])
    """

    def __init__(self, storage_dtype: torch.dtype) -> None:
        self.storage_dtype = storage_dtype

    def encode(self, adv: torch.Tensor, clean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stored = adv.detach().to(self.storage_dtype)
        # A finite value can still overflow a narrow dtype (7e4 -> inf in float16).
        return stored, _finite_rows(adv, _largest(self.storage_dtype))

    def decode(self, stored: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        return stored.to(clean.dtype)


class Uint8ExampleCodec:
    """Stores the example in [0, 1] on the 1/255 grid (rounded, clamped).

    Args:
        eps: when given, read-back examples are projected into the L-inf eps-ball of the current
            clean input (and [0, 1]), which undoes the up-to-half-a-step rounding excess.

    Example:
        >>> codec = Uint8ExampleCodec(eps=None)
        >>> stored, _ = codec.encode(torch.tensor([[0.5, 1.7, -0.2]]), torch.zeros(1, 3))
        >>> stored.tolist()
        [[128, 255, 0]]
    """

    storage_dtype = torch.uint8

    def __init__(self, eps: float | None) -> None:
        self.eps = eps

    def encode(self, adv: torch.Tensor, clean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Clamp before the cast: a float -> uint8 cast truncates and wraps around (-1 -> 255).
        stored = adv.detach().clamp(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)
        return stored, _finite_rows(adv)

    def decode(self, stored: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        example = stored.to(clean.dtype).div_(255.0)
        if self.eps is not None:
            # clean + clamp(example - clean, -eps, eps), in place: a batch-sized temporary (such
            # as clean - eps) costs page faults on top of its pass.
            example.sub_(clean).clamp_(-self.eps, self.eps).add_(clean).clamp_(0.0, 1.0)
        return example


class FloatPerturbationCodec:
    """Stores ``delta = adv - clean`` in a float dtype and replays it on the current clean input.

    Example:
        >>> codec = FloatPerturbationCodec(torch.float32, eps=None)
        >>> stored, _ = codec.encode(torch.tensor([[0.3]]), torch.tensor([[0.2]]))
        >>> [round(v, 4) for v in codec.decode(stored, torch.tensor([[0.95]]))[0].tolist()]
        [1.0]
    """

    def __init__(self, storage_dtype: torch.dtype, eps: float | None) -> None:
        self.storage_dtype = storage_dtype
        self.eps = eps

    def encode(self, adv: torch.Tensor, clean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        delta = adv.detach() - clean.detach()
        if self.eps is None:
            return delta.to(self.storage_dtype), _finite_rows(delta, _largest(self.storage_dtype))
        # Checked before the clamp, which would turn an Inf into +-eps and hide it; after the
        # clamp every value fits the storage dtype unless eps itself does not.
        ok = _finite_rows(delta) & (self.eps <= _largest(self.storage_dtype))
        delta.clamp_(-self.eps, self.eps)
        return delta.to(self.storage_dtype), ok

    def decode(self, stored: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        return (clean + stored.to(clean.dtype)).clamp_(0.0, 1.0)


class Int8PerturbationCodec:
    """Stores ``delta = adv - clean`` as int8 at scale ``eps / 127``.

    The stored delta is clamped to the eps-ball; the read-back error is at most half a step,
    ``eps / 254``, before the final clip to [0, 1].

    Example:
        >>> codec = Int8PerturbationCodec(eps=0.127)
        >>> stored, _ = codec.encode(torch.tensor([[0.5 + 0.05]]), torch.tensor([[0.5]]))
        >>> stored.tolist()
        [[50]]
    """

    storage_dtype = torch.int8

    def __init__(self, eps: float) -> None:
        self.eps = eps
        self.scale = eps / 127.0

    def encode(self, adv: torch.Tensor, clean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        delta = adv.detach() - clean.detach()
        ok = _finite_rows(delta)  # NaN or Inf in either input makes the delta non-finite
        steps = delta.div_(self.scale).round_().clamp_(-127, 127)
        # NaN -> int8 is undefined; such rows are rejected, but zero them so no NaN is cast. On a
        # GPU always: asking whether any row is rejected would make the host wait for the device.
        if steps.device.type != "cpu" or not bool(ok.all()):
            steps = torch.nan_to_num_(steps, nan=0.0)
        return steps.to(torch.int8), ok

    def decode(self, stored: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        return stored.to(clean.dtype).mul_(self.scale).add_(clean).clamp_(0.0, 1.0)


def make_codec(*, mode: Mode, dtype: torch.dtype, eps: float | None) -> Codec:
    """Builds the codec for a storage ``dtype`` and ``mode``, checking that they fit together.

    Raises:
        ValueError: an unknown mode, a dtype the mode cannot use, int8 without ``eps``, or an
            ``eps`` that is not a positive finite number.
        TypeError: ``dtype`` is not a ``torch.dtype``.

    Example:
        >>> type(make_codec(mode="perturbation", dtype=torch.int8, eps=8 / 255)).__name__
        'Int8PerturbationCodec'
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.float16, got {dtype!r}")
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"dtype {dtype} is not supported; use one of {', '.join(STORAGE_DTYPE_NAMES)}"
        )
    if eps is not None:
        eps = finite_number("eps", eps, positive=True)
    check_choice("mode", mode, MODES)
    if mode == "example":
        if dtype in FLOAT_DTYPES:
            return FloatExampleCodec(dtype)
        if dtype == torch.uint8:
            return Uint8ExampleCodec(eps)
        raise ValueError(
            "dtype torch.int8 stores a perturbation: use mode='perturbation' with eps, "
            "or dtype=torch.uint8 for compressed examples"
        )
    # mode == "perturbation"
    if dtype in FLOAT_DTYPES:
        return FloatPerturbationCodec(dtype, eps)
    if dtype == torch.int8:
        if eps is None:
            raise ValueError(
                "dtype torch.int8 with mode='perturbation' needs eps (the delta is stored "
                "at scale eps/127), got eps=None"
            )
        return Int8PerturbationCodec(eps)
    raise ValueError(
        "dtype torch.uint8 stores examples: use mode='example', or dtype=torch.int8 "
        "for a compressed perturbation"
    )
