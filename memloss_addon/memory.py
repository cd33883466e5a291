"""``MemoryWrapper``: the object users add to their training step.

One call per step: read the memory examples of the batch's samples, run the model on them, compute
the MemLoss term against the clean logits, then store this step's adversarial examples.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .checks import check_batch, check_choice, check_indices, check_shape, positive_int
from .loss import memloss_term
from .model_state import batchnorm_mode
from .options import BN_MODES, WEIGHTINGS, BNMode, Distribution, Mode, Weighting
from .store import FORMAT_VERSION, dtype_name, estimate_nbytes, resolve_device
from .store.factory import make_store
from .store.file_format import MemoryFileError, mapped_memory_file, write_memory_file
from .store.files import PathLike

__all__ = ["MemoryWrapper"]

_LOSS_SETTINGS = ("beta_prime", "weighting", "detach_weight", "bn_mode")


class MemoryWrapper:
    r"""Keeps each sample's previous adversarial example and returns the MemLoss term.

    MemLoss (Mahdi et al., "MemLoss: Enhancing Adversarial Training with Recycling Adversarial
    Examples", https://arxiv.org/abs/2510.09105) adds to a base objective such as TRADES::

        beta' * (1/B) * sum_i (1/K_i) * sum_{k filled} (1 - p_y(m_ik)) * KL(p(x_i) || p(m_ik))

    where ``m_ik`` is the adversarial example stored for sample ``i`` ``k + 1`` calls ago (``depth``
    slots, ``K_i`` of them filled). A call reads the memory as it was before the call, computes the
    term, then stores ``adv`` as each sample's newest slot.

    Args:
        model: the model being trained. Held by reference for the forward pass on memory examples,
            never saved in :meth:`state_dict`.
        num_samples: size of the training set; samples are keyed by dataset index.
        sample_shape: shape of one input, e.g. ``(3, 32, 32)``.
        beta_prime: weight ``beta'`` of the term (default 2.0). With 0 the call only stores.
        depth: slots per sample (default 1, the previous epoch's example).
        weighting: ``"difficulty"`` (``1 - p_y`` of the memory example, default) or ``"none"``.
        mode: ``"example"`` stores ``adv`` (default); ``"perturbation"`` stores ``adv - clean`` and
            replays ``clip(clean + delta, 0, 1)`` on the current clean input.
        dtype: storage dtype: ``torch.float32`` (default), ``float16``, ``bfloat16``, ``uint8``
            (mode "example": rounded to the 1/255 grid) or ``int8`` (mode "perturbation": delta at
            scale ``eps / 127``).
        device: where the memory lives: ``"cpu"`` (default; pinned when CUDA is present) or a CUDA
            device. Memory examples are always returned on the batch's device.
        eps: the attack's L-inf radius. Required for int8; with uint8 it re-projects read-back
            examples into the eps-ball of the current clean input.
        bn_mode: normalization policy of the memory forward pass: ``"train"`` (the model as it is,
            default), ``"frozen"`` (batch statistics, running statistics untouched) or ``"eval"``.
        detach_weight: stop the gradient through the ``1 - p_y`` weight (default ``True``).
        logits_fn: maps the model's output to logits, for models that return tuples or dicts.
        pin_memory: pin a CPU memory; ``None`` (default) pins it when CUDA is available.
        distributed: ``None`` (default: this process only), ``"sharded"`` (each rank of
            ``torch.distributed`` holds about ``num_samples / world_size`` samples and rows are
            exchanged with their owners every call) or ``"replicated"`` (every rank holds all
            samples; each call's new rows go to every rank). Each rank's term, over its own
            batch as its loss is, equals that of one process that has stored every rank's
            earlier batches; see :mod:`memloss_addon.store.distributed`.
        process_group: the ``torch.distributed`` group of a distributed memory (default: all).
        storage_path: keep the memory in this folder on disk instead of RAM, so it may exceed
            RAM; an existing folder of the same configuration is reopened, bookkeeping included.
            See :mod:`memloss_addon.store.disk`.

    Raises:
        TypeError, ValueError: an argument has the wrong type or value (the message names it).

    Example:
        >>> model = nn.Linear(4, 3)
        >>> memory = MemoryWrapper(model, num_samples=10, sample_shape=(4,))
        >>> idx, x, y = torch.tensor([0, 7]), torch.rand(2, 4), torch.tensor([1, 2])
        >>> x_adv = (x + 0.03).clamp(0, 1)
        >>> memory(idx, x, x_adv, model(x), y).item()  # first epoch: nothing stored yet
        0.0
        >>> term = memory(idx, x, x_adv, model(x), y)  # the next epoch
        >>> term.dim(), bool(term > 0), memory.stats()["filled_fraction"]
        (0, True, 0.2)

    .. note::
        This is deliberately not an ``nn.Module``: ``.to()``, ``.half()`` or ``state_dict()`` of a
        parent module never move, cast or save the memory. Save it with :meth:`state_dict`.
    """

    _term_sum: torch.Tensor | None
    _weight_sum: torch.Tensor | None
    _last_term: torch.Tensor | float | None

    def __init__(
        self,
        model: nn.Module,
        num_samples: int,
        sample_shape: tuple[int, ...] | torch.Size,
        *,
        beta_prime: float = 2.0,
        depth: int = 1,
        weighting: Weighting = "difficulty",
        mode: Mode = "example",
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        eps: float | None = None,
        bn_mode: BNMode = "train",
        detach_weight: bool = True,
        logits_fn: Callable[[Any], torch.Tensor] | None = None,
        pin_memory: bool | None = None,
        distributed: Distribution | None = None,
        process_group: Any = None,
        storage_path: str | os.PathLike[str] | None = None,
    ) -> None:
        if not callable(model):
            raise TypeError(f"model must be a callable nn.Module, got {type(model).__name__}")
        num_samples = positive_int("num_samples", num_samples)
        sample_shape = check_shape("sample_shape", sample_shape)
        depth = positive_int("depth", depth)
        check_choice("weighting", weighting, WEIGHTINGS)
        check_choice("bn_mode", bn_mode, BN_MODES)
        if not isinstance(detach_weight, bool):
            raise TypeError(f"detach_weight must be a bool, got {detach_weight!r}")
        if logits_fn is not None and not callable(logits_fn):
            raise TypeError(f"logits_fn must be callable or None, got {logits_fn!r}")
        self._model = model
        self.beta_prime = beta_prime
        self.weighting: Weighting = weighting
        self.bn_mode: BNMode = bn_mode
        self.detach_weight = detach_weight
        self.logits_fn = logits_fn
        self.store = make_store(
            distributed=distributed,
            process_group=process_group,
            num_samples=num_samples,
            sample_shape=sample_shape,
            depth=depth,
            mode=mode,
            dtype=dtype,
            eps=eps,
            device=device,
            pin_memory=pin_memory,
            storage_path=storage_path,
        )
        self._reset_counters()

    # ------------------------------------------------------------------ configuration

    @property
    def model(self) -> nn.Module:
        """The model run on memory examples (held by reference)."""
        return self._model

    @property
    def beta_prime(self) -> float:
        """Weight of the term; may be changed between calls (e.g. a warm-up schedule)."""
        return self._beta_prime

    @beta_prime.setter
    def beta_prime(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"beta_prime must be a number, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"beta_prime must be finite and >= 0, got {value!r}")
        self._beta_prime = float(value)

    @property
    def num_samples(self) -> int:
        return self.store.num_samples

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.store.sample_shape

    @property
    def depth(self) -> int:
        return self.store.depth

    @property
    def dtype(self) -> torch.dtype:
        return self.store.dtype

    @property
    def mode(self) -> Mode:
        return self.store.mode

    @property
    def eps(self) -> float | None:
        return self.store.eps

    @property
    def device(self) -> torch.device:
        return self.store.device

    @property
    def nbytes(self) -> int:
        """Bytes the memory holds: slots, bookkeeping and any pinned staging buffers."""
        return self.store.nbytes

    @property
    def local_rows(self) -> int:
        """Samples whose slots this process holds: ``num_samples`` unless sharded across ranks."""
        return self.store.local_rows

    @staticmethod
    def estimate_nbytes(
        num_samples: int,
        sample_shape: tuple[int, ...],
        *,
        depth: int = 1,
        dtype: torch.dtype = torch.float32,
    ) -> int:
        """Bytes a memory of this configuration will allocate, before allocating it.

        Example:
            >>> MemoryWrapper.estimate_nbytes(50_000, (3, 32, 32), dtype=torch.float16)
            307600000
        """
        return estimate_nbytes(
            positive_int("num_samples", num_samples),
            check_shape("sample_shape", sample_shape),
            depth=positive_int("depth", depth),
            dtype=dtype,
        )

    # ------------------------------------------------------------------ the call

    def __call__(
        self,
        indices: torch.Tensor,
        clean: torch.Tensor,
        adv: torch.Tensor,
        logits: torch.Tensor,
        targets: torch.Tensor,
    ) -> torch.Tensor:
        """Returns the MemLoss term of the batch, then stores ``adv`` in the memory.

        Args:
            indices: ``(B,)`` dataset indices (any integer tensor, array or list; CPU is cheapest).
            clean: ``(B, *sample_shape)`` clean inputs.
            adv: ``(B, *sample_shape)`` this step's adversarial examples (stored detached).
            logits: ``(B, C)`` clean logits, with their graph.
            targets: ``(B,)`` integer labels.

        Returns:
            A 0-dim fp32 tensor. Zero, with no forward pass, when no sample of the batch has a
            filled slot or ``beta_prime`` is 0.

        Raises:
            TypeError, ValueError, IndexError: bad arguments; the memory is left unchanged.
        """
        try:
            check_batch(
                clean=clean, adv=adv, logits=logits, targets=targets, sample_shape=self.sample_shape
            )
            index = check_indices(indices, batch_size=clean.shape[0], num_samples=self.num_samples)
        except (TypeError, ValueError, IndexError):
            self.store.abort()  # a distributed store tells the other ranks, which raise too
            raise
        term = self._term(index, clean, logits, targets)
        with torch.no_grad():
            rejected = self.store.write(index, adv, clean)
        self._count_write(index.shape[0], rejected)
        return term

    def _term(
        self,
        index: torch.Tensor,
        clean: torch.Tensor,
        logits: torch.Tensor,
        targets: torch.Tensor,
    ) -> torch.Tensor:
        self._calls += 1
        if self._beta_prime == 0.0:
            return self._zero(logits)
        with torch.no_grad():
            read = self.store.read(index, clean)
        if not read.needs_forward:
            return self._zero(logits)
        with batchnorm_mode(self._model, self.bn_mode):
            output = self._model(read.examples)
        memory_logits = self.logits_fn(output) if self.logits_fn is not None else output
        term, weight = memloss_term(
            logits,
            memory_logits,
            targets,
            sample_of_row=read.sample_of_row,
            slots_of_sample=read.slots_of_sample,
            beta_prime=self._beta_prime,
            weighting=self.weighting,
            detach_weight=self.detach_weight,
        )
        self._count_read(read.num_rows, term, weight)
        return term

    def _zero(self, logits: torch.Tensor) -> torch.Tensor:
        self._last_term = 0.0  # a float: stats() then needs no device sync for it
        # A fresh zero: adding it changes no value or gradient, and it can be backpropagated.
        return torch.zeros(
            (),
            dtype=torch.float32,
            device=logits.device,
            requires_grad=torch.is_grad_enabled() and logits.requires_grad,
        )

    # ------------------------------------------------------------------ statistics

    def _reset_counters(self) -> None:
        self._calls = 0
        self._terms_computed = 0
        self._rows_read = 0
        self._rows_written = 0
        self._rejected_rows = 0
        self._warned_rejected = False
        # Sums stay on the batch's device so that a step never waits for the GPU.
        self._term_sum = None
        self._weight_sum = None
        self._last_term = None

    def _count_read(self, rows: int, term: torch.Tensor, weight: torch.Tensor) -> None:
        self._terms_computed += 1
        self._rows_read += rows
        value = term.detach().double()
        device = value.device
        term_sum, weight_sum = self._term_sum, self._weight_sum
        if term_sum is None or weight_sum is None:
            term_sum = torch.zeros((), dtype=torch.float64, device=device)
            weight_sum = torch.zeros((), dtype=torch.float64, device=device)
        elif term_sum.device != device:  # the batch moved (or a loaded state): follow it
            term_sum, weight_sum = term_sum.to(device), weight_sum.to(device)
        self._term_sum = term_sum + value
        self._weight_sum = weight_sum + weight.double().sum()
        self._last_term = value

    def _count_write(self, rows: int, rejected: int) -> None:
        self._rows_written += rows - rejected
        self._rejected_rows += rejected
        if rejected and not self._warned_rejected:
            self._warned_rejected = True
            warnings.warn(
                f"{rejected} row(s) of adv held NaN or Inf (or overflowed {dtype_name(self.dtype)})"
                " and were not stored; those samples keep their previous memory. Further rejected "
                "rows are counted in stats()['rejected_rows'] without another warning.",
                RuntimeWarning,
                stacklevel=3,
            )

    def stats(self) -> dict[str, float | int]:
        """Counters for logging.

        Keys: ``calls``, ``terms_computed`` (calls that ran the memory forward pass), ``rows_read``
        (memory examples used), ``rows_written``, ``rejected_rows`` (non-finite rows not stored),
        ``filled_fraction`` (filled slots / all slots), ``mean_term`` and ``mean_weight`` (over the
        calls that computed a term; NaN before the first), ``last_term`` (the value the last call
        returned; NaN before the first call), ``nbytes``.
        This synchronizes with the GPU once; call it when logging, not every step.
        """
        computed = self._terms_computed
        term_sum = float(self._term_sum) if self._term_sum is not None else 0.0
        weight_sum = float(self._weight_sum) if self._weight_sum is not None else 0.0
        return {
            "calls": self._calls,
            "terms_computed": computed,
            "rows_read": self._rows_read,
            "rows_written": self._rows_written,
            "rejected_rows": self._rejected_rows,
            "filled_fraction": self.store.filled_fraction(),
            "mean_term": term_sum / computed if computed else float("nan"),
            "mean_weight": weight_sum / self._rows_read if self._rows_read else float("nan"),
            "last_term": float(self._last_term) if self._last_term is not None else float("nan"),
            "nbytes": self.nbytes,
            **self.store.stats(),
        }

    def prefetch(self, next_indices: object, *, device: str | torch.device | None = None) -> None:
        """Starts reading the memory of the next batch, so the copy overlaps this step's attack.

        A call uses the prefetched rows only if its indices are exactly ``next_indices`` (other
        calls ignore them, so a prefetch may also be issued before the current step's call), and
        a write to any of those samples before that call discards them: a call never sees stale
        rows. On CUDA the copy runs on a side stream through a pinned buffer; on the CPU the rows
        are gathered at once (a disk-backed memory reads its pages ahead). A sharded memory
        ignores prefetches: its read starts with a collective.

        Args:
            next_indices: the dataset indices of the next batch.
            device: the next batch's device (default: the last batch's).

        Raises:
            TypeError, ValueError, IndexError: bad indices or device (nothing is started).

        Example:
            >>> memory = MemoryWrapper(nn.Linear(2, 2), num_samples=4, sample_shape=(2,))
            >>> memory.prefetch([1, 3], device="cpu")
        """
        try:
            length = len(next_indices)  # type: ignore[arg-type]
        except TypeError:  # not a sequence: check_indices names the problem
            length = -1
        index = check_indices(next_indices, batch_size=length, num_samples=self.num_samples)
        self.store.prefetch(index, None if device is None else resolve_device(device))

    # ------------------------------------------------------------------ state

    def config(self) -> dict[str, Any]:
        """The configuration recorded in :meth:`state_dict`."""
        return {
            **self.store.config(),
            "beta_prime": self._beta_prime,
            "weighting": self.weighting,
            "detach_weight": self.detach_weight,
            "bn_mode": self.bn_mode,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically: slots, fill counts, ring heads, counters.

        Holds only tensors and primitives, so ``torch.load(..., weights_only=True)`` reads it back.
        The model is not included. Like ``nn.Module.state_dict``, the slot tensors alias the live
        memory: save them (or clone them) before training goes on.
        """
        return {
            "format_version": FORMAT_VERSION,
            "config": self.config(),
            **self.store.state_dict(),
            "counters": self._counters_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any], *, strict: bool = True) -> None:
        """Restores a :meth:`state_dict`, after checking that it fits this memory.

        Args:
            state_dict: a dict from :meth:`state_dict` (possibly saved and loaded).
            strict: also require the loss settings (``beta_prime``, ``weighting``,
                ``detach_weight``, ``bn_mode``) to match; with ``False`` only the storage layout
                must match and this wrapper's own loss settings are kept.

        Raises:
            TypeError, ValueError: the state does not fit; the memory is left unchanged.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        version = state_dict.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"memory state has format_version {version!r}, this version reads {FORMAT_VERSION}"
            )
        config = state_dict.get("config")
        if not isinstance(config, dict):
            raise ValueError("memory state has no 'config' dict")
        mine = self.config()
        keys = list(self.store.config()) + (list(_LOSS_SETTINGS) if strict else [])
        mismatched = {k: (config.get(k), mine[k]) for k in keys if config.get(k) != mine[k]}
        if mismatched:
            details = ", ".join(
                f"{k}: saved {a!r} vs this memory {b!r}" for k, (a, b) in mismatched.items()
            )
            raise ValueError(f"memory state does not match this memory's configuration ({details})")
        counters = _check_counters(state_dict.get("counters"))
        self.store.load_state(state_dict)
        self._load_counters(counters)

    def _counters_state(self) -> dict[str, Any]:
        return {
            "calls": self._calls,
            "terms_computed": self._terms_computed,
            "rows_read": self._rows_read,
            "rows_written": self._rows_written,
            "rejected_rows": self._rejected_rows,
            "term_sum": float(self._term_sum) if self._term_sum is not None else 0.0,
            "weight_sum": float(self._weight_sum) if self._weight_sum is not None else 0.0,
            "last_term": float(self._last_term) if self._last_term is not None else float("nan"),
        }

    def _load_counters(self, counters: dict[str, Any]) -> None:
        self._reset_counters()
        for key in ("calls", "terms_computed", "rows_read", "rows_written", "rejected_rows"):
            setattr(self, f"_{key}", int(counters[key]))
        last_term = float(counters["last_term"])
        self._last_term = None if math.isnan(last_term) else last_term
        if self._terms_computed:
            self._term_sum = torch.tensor(float(counters["term_sum"]), dtype=torch.float64)
            self._weight_sum = torch.tensor(float(counters["weight_sum"]), dtype=torch.float64)

    def __repr__(self) -> str:
        config = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({config}, device={str(self.device)!r})"

    # ------------------------------------------------------------------ files

    def save(self, path: PathLike) -> None:
        """Writes the memory to one file, atomically and without a second copy in RAM.

        A crash at any moment leaves either the previous file or the new one. The file holds a
        JSON header (configuration, counters, format version) and the raw slots with a CRC-32;
        see :mod:`memloss_addon.store.file_format` for the layout. The model is not saved.
        """
        write_memory_file(self.state_dict(), path)

    def load(self, path: PathLike, *, strict: bool = True) -> None:
        """Loads a file written by :meth:`save`, after checking all of it; never unpickles.

        Args:
            path: the file.
            strict: also require the loss settings to match (as in :meth:`load_state_dict`).

        Raises:
            MemoryFileError: (a ``ValueError``) another format, a damaged or truncated file, or
                another configuration. The memory is left unchanged.
        """
        with mapped_memory_file(path) as state:
            try:
                self.load_state_dict(state, strict=strict)
            except (TypeError, ValueError) as error:
                raise MemoryFileError(f"{os.fspath(path)}: {error}") from error


def _check_counters(counters: object) -> dict[str, Any]:
    if not isinstance(counters, dict):
        raise ValueError("memory state has no 'counters' dict")
    for key in ("calls", "terms_computed", "rows_read", "rows_written", "rejected_rows"):
        value = counters.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"memory state counter {key!r} must be an int >= 0, got {value!r}")
    for key in ("term_sum", "weight_sum", "last_term"):
        if not isinstance(counters.get(key), (int, float)):
            raise ValueError(f"memory state counter {key!r} must be a number")
    return counters
