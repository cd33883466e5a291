"""``MemoryWrapper``: the object users add to their training step.

One call per step: read the memory examples of the batch's samples, run the model on them, compute
the MemLoss term against the clean logits, then store this step's adversarial examples.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from .checks import (
    check_batch,
    check_choice,
    check_indices,
    check_shape,
    finite_number,
    positive_int,
)
from .loss import log_probs, memloss_term
from .model_state import batchnorm_mode, eval_mode
from .objectives.pgd import project_linf
from .options import BN_MODES, WEIGHTINGS, BNMode, Distribution, Mode, Weighting
from .statistics import Counters
from .store import FORMAT_VERSION, dtype_name, estimate_nbytes, resolve_device
from .store.factory import make_store
from .store.file_format import MemoryFileError, mapped_memory_file, write_memory_file
from .store.files import PathLike
from .store.local import READABLE_FORMAT_VERSIONS, MemoryRead, SeenAtWrite
from .store.slots import FOOLED_UNKNOWN
from .store.transfer import to_device
from .views import crop_flip, uncrop_flip

__all__ = ["MemoryWrapper", "View"]

View = tuple[torch.Tensor, torch.Tensor]
"""``(offsets, flips)`` of a batch of crop-and-flip views of padded inputs (see
:mod:`memloss_addon.views`)."""

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
        device: where the memory lives: ``"cpu"`` (default) or a CUDA device. Memory examples
            are always returned on the batch's device.
        eps: the attack's L-inf radius. Required for int8; with uint8 it re-projects read-back
            examples into the eps-ball of the current clean input.
        bn_mode: normalization policy of the memory forward pass: ``"train"`` (the model as it is,
            default), ``"frozen"`` (batch statistics, running statistics untouched) or ``"eval"``.
        detach_weight: stop the gradient through the ``1 - p_y`` weight (default ``True``).
        logits_fn: maps the model's output to logits, for models that return tuples or dicts.
        pin_memory: read a CPU (or disk-backed) memory to CUDA through pinned staging buffers, a
            few batches of rows; the memory itself is never pinned (``None``, the default: when
            CUDA is available). See docs/devices.md.
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
        replay_fraction: selective replay (default 1.0: every filled slot). With ``f < 1`` a call
            runs the model on only the ``ceil(f * R)`` of its ``R`` filled memory rows with the
            largest last known weight ``1 - p_y``, from the last time the model saw the example:
            at a read, or when it was stored if the call that stored it passed ``adv_logits``.
            Rows never seen come first; ties go in batch order. The rows left out are not read
            and contribute 0, and the term keeps its ``1/B`` normalisation, so it shrinks with
            ``f`` (raise ``beta_prime`` to compensate). Not available with ``distributed``.
        diagnostics: classify every memory row a call reads with the current model (eval mode,
            no gradient, BatchNorm statistics, module flags and random streams untouched), and
            count in :meth:`stats` how many are classified correctly now, and how many were
            forgotten (did not fool the model when stored, fool it now) or recovered (the other
            way round; known for rows stored by calls that passed ``adv_logits``). Costs one
            forward pass of the read rows and one host sync per call. With it, rows are read
            (and classified) also when ``beta_prime`` is 0, which keeps training unchanged.
        view_padding: align the memory with a crop-and-flip augmentation of inputs padded by
            this many pixels (as ATTA does): each call passes ``view=(offsets, flips)``, the
            crop corners in the padded frame and the mirror flags of its batch; perturbations
            are stored in the padded frame and replayed on the same image pixels under the
            current view (pixels the stored view did not cover replay the clean input). Needs
            ``mode="perturbation"`` and a ``(C, H, W)`` sample shape; rows hold the padded frame.

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

    _warned_no_write: bool
    _warned_labels: bool
    _checked_coverage: bool
    _frozen: bool

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
        replay_fraction: float = 1.0,
        diagnostics: bool = False,
        view_padding: int | None = None,
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
        replay_fraction = finite_number("replay_fraction", replay_fraction, positive=True)
        if replay_fraction > 1:
            raise ValueError(f"replay_fraction must lie in (0, 1], got {replay_fraction!r}")
        if replay_fraction < 1 and distributed is not None:
            raise ValueError(
                f"replay_fraction={replay_fraction} is not available with distributed="
                f"{distributed!r}: the weights that select rows are kept by one process"
            )
        self.replay_fraction = replay_fraction
        self._sample_shape = sample_shape
        self.view_padding = view_padding
        if not isinstance(diagnostics, bool):
            raise TypeError(f"diagnostics must be a bool, got {diagnostics!r}")
        self.diagnostics = diagnostics
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
            sample_shape=self._stored_shape(sample_shape, view_padding, mode),
            depth=depth,
            mode=mode,
            dtype=dtype,
            eps=eps,
            device=device,
            pin_memory=pin_memory,
            storage_path=storage_path,
        )
        self._reset_counters()
        self._counters.counts["calls"] = self.store.step  # a reopened folder's last step

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
        """Shape of one input (a view, with ``view_padding``)."""
        return self._sample_shape

    @staticmethod
    def _stored_shape(
        sample_shape: tuple[int, ...], view_padding: int | None, mode: Mode
    ) -> tuple[int, ...]:
        if view_padding is None:
            return sample_shape
        padding = positive_int("view_padding", view_padding)
        if mode != "perturbation":
            raise ValueError(
                f"view_padding needs mode='perturbation', got mode={mode!r}: an example stored "
                "in the padded frame would lack the pixels its view did not cover"
            )
        if len(sample_shape) != 3:
            raise ValueError(f"view_padding needs a (C, H, W) sample_shape, got {sample_shape}")
        channels, height, width = sample_shape
        return (channels, height + 2 * padding, width + 2 * padding)

    def _in_stored_frame(
        self, view: View | None, clean: torch.Tensor, adv: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``clean`` and ``adv`` as the store keeps them: in the padded frame when aligned."""
        if self.view_padding is None:
            if view is not None:
                raise ValueError("view= needs a memory built with view_padding")
            return clean, adv
        if not (isinstance(view, tuple) and len(view) == 2):
            raise ValueError(
                f"a memory with view_padding={self.view_padding} needs view=(offsets, flips), "
                f"got {type(view).__name__}"
            )
        offsets, flips = view
        frame = clean.detach().new_zeros((clean.shape[0], *self.store.sample_shape))
        return (
            uncrop_flip(clean.detach(), offsets, flips, into=frame),
            uncrop_flip(adv.detach(), offsets, flips, into=frame),
        )

    def _in_view(self, read: MemoryRead, view: View | None) -> MemoryRead:
        """A read in the padded frame cropped to each row's current view."""
        if view is None or not read.num_rows:
            return read
        offsets, flips = view
        rows = to_device(read.sample_of_row, offsets.device)
        examples = crop_flip(
            read.examples,
            offsets.index_select(0, rows),
            flips.index_select(0, rows),
            (self.sample_shape[1], self.sample_shape[2]),
        )
        return dataclasses.replace(read, examples=examples)

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
            307850000
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
        *,
        adv_logits: torch.Tensor | None = None,
        write: bool | None = None,
        view: View | None = None,
    ) -> torch.Tensor:
        """Returns the MemLoss term of the batch, then stores ``adv`` in the memory.

        Args:
            indices: ``(B,)`` dataset indices (any integer tensor, array or list; CPU is cheapest).
            clean: ``(B, *sample_shape)`` clean inputs.
            adv: ``(B, *sample_shape)`` this step's adversarial examples (stored detached).
            logits: ``(B, C)`` clean logits, with their graph.
            targets: ``(B,)`` integer labels.
            adv_logits: ``(B, C)`` the model's logits on ``adv`` (the objectives return them), if
                at hand: the memory then records whether each stored example fooled the model
                when it was made (for the forgetting diagnostics). Costs no forward pass.
            write: store ``adv`` (``True``) or not (``False``). By default a call stores only
                when the model is in training mode with gradients enabled, outside
                :meth:`frozen`: a call made while evaluating (a test batch, say) would otherwise
                overwrite training samples' memory; such a call warns once.
            view: ``(offsets, flips)``: with ``view_padding``, the ``(B, 2)`` int64 crop corners
                in the padded frame and ``(B,)`` bool mirror flags of the batch's views.

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
            if adv_logits is not None:
                _check_adv_logits(adv_logits, logits)
            store_clean, store_adv = self._in_stored_frame(view, clean, adv)
            writing = self._should_write(write)
        except (TypeError, ValueError, IndexError):
            self.store.abort()  # a distributed store tells the other ranks, which raise too
            raise
        self._warn_if_indices_look_like_labels(index, targets)
        try:
            term = self._term(index, store_clean, logits, targets, view)
        except BaseException:
            self.store.fail_step(writing)  # a distributed store tells the ranks waiting for it
            raise
        if not writing:
            return term
        with torch.no_grad():
            seen = None if adv_logits is None else _seen_at_write(adv_logits, targets)
            rejected = self.store.write(index, store_adv, store_clean, seen=seen)
        self._count_write(index.shape[0], rejected)
        self._warn_if_samples_are_never_visited()
        return term

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Calls inside this block compute the term but store nothing (no warning).

        Example:
            >>> model = nn.Linear(2, 2)
            >>> memory = MemoryWrapper(model, num_samples=2, sample_shape=(2,))
            >>> x, y = torch.rand(2, 2), torch.tensor([0, 1])
            >>> with memory.frozen():
            ...     _ = memory(torch.arange(2), x, x, model(x), y)
            >>> memory.stats()["rows_written"]
            0
        """
        previous, self._frozen = self._frozen, True
        try:
            yield
        finally:
            self._frozen = previous

    def _should_write(self, write: bool | None) -> bool:
        if write is not None:
            if not isinstance(write, bool):
                raise TypeError(f"write must be a bool or None, got {write!r}")
            return write
        if self._frozen:
            return False
        training = self._model.training if isinstance(self._model, nn.Module) else True
        if training and torch.is_grad_enabled():
            return True
        if not self._warned_no_write:
            self._warned_no_write = True
            state = "in eval mode" if not training else "under torch.no_grad()"
            warnings.warn(
                f"MemoryWrapper called with the model {state}: adv was not stored, so an "
                "evaluation batch cannot overwrite training samples' memory. Pass write=True to "
                "store anyway, or call inside memory.frozen() to silence this warning.",
                RuntimeWarning,
                stacklevel=3,
            )
        return False

    def _warn_if_indices_look_like_labels(self, index: torch.Tensor, targets: torch.Tensor) -> None:
        # Checked for CPU targets only: on CUDA the comparison would cost a host sync per call.
        if self._warned_labels or targets.device.type != "cpu" or index.numel() < 8:
            return
        if torch.equal(index, targets.to(torch.int64)):
            self._warned_labels = True
            warnings.warn(
                "the indices passed to MemoryWrapper equal the labels: pass each sample's dataset "
                "index (IndexedDataset adds it to every batch), not its class",
                RuntimeWarning,
                stacklevel=3,
            )

    def _warn_if_samples_are_never_visited(self) -> None:
        if self._checked_coverage:
            return
        stats = self.store.stats()
        written = int(stats.get("rows_accepted_all_ranks", self._counters.counts["rows_written"]))
        if written < 2 * self.num_samples:
            return
        self._checked_coverage = True  # once: the check reads all fill counts
        missing = self.num_samples - self.store.filled_samples()
        if missing:
            warnings.warn(
                f"{missing} of {self.num_samples} samples have no memory after "
                f"{written} rows were stored (two epochs' worth): a loader with drop_last=True, "
                "or a sampler that skips samples, never gives them a memory example",
                RuntimeWarning,
                stacklevel=3,
            )

    def _term(
        self,
        index: torch.Tensor,
        clean: torch.Tensor,
        logits: torch.Tensor,
        targets: torch.Tensor,
        view: View | None,
    ) -> torch.Tensor:
        self._counters.count(calls=1)
        self.store.step = self._counters.counts["calls"]  # recorded with this call's changes
        if self._beta_prime == 0.0 and not self.diagnostics:
            return self._zero(logits)
        with torch.no_grad():
            read = self._in_view(self.store.read(index, clean), view)
        if self.diagnostics and read.num_rows:
            self._diagnose(read, targets, num_classes=logits.shape[1])
        if self._beta_prime == 0.0:
            return self._zero(logits)
        if self.replay_fraction < 1 and read.num_rows:
            filled = read.num_rows
            read = read.subset(self._select_rows(read))
            self._counters.count(rows_skipped=filled - read.num_rows)
        if not read.needs_forward:
            return self._zero(logits)
        with batchnorm_mode(self._model, self.bn_mode):
            output = self._model(read.examples)
        memory_logits = self._as_logits(output, num_classes=logits.shape[1])
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
        self._counters.count(terms_computed=1, rows_read=read.num_rows)
        self._counters.add_term(term, weight)
        if self.replay_fraction < 1 and read.slot_ids is not None:
            self.store.record_weights(read.slot_ids, _difficulty(memory_logits, targets, read))
        return term

    def _as_logits(self, output: Any, *, num_classes: int | None) -> torch.Tensor:
        """The model's output as logits like the caller's, or a TypeError naming ``logits_fn``."""
        memory_logits = self.logits_fn(output) if self.logits_fn is not None else output
        if (
            not isinstance(memory_logits, torch.Tensor)
            or not memory_logits.is_floating_point()
            or memory_logits.dim() != 2
            or (num_classes is not None and memory_logits.shape[1] != num_classes)
        ):
            got = (
                f"a tensor of shape {tuple(memory_logits.shape)} and dtype {memory_logits.dtype}"
                if isinstance(memory_logits, torch.Tensor)
                else f"a {type(memory_logits).__name__}"
            )
            source = "logits_fn(model(x))" if self.logits_fn is not None else "the model"
            shape = f"(batch, {num_classes})" if num_classes is not None else "(batch, classes)"
            raise TypeError(
                f"{source} returned {got}, not logits of shape {shape}; for a model that "
                "returns a tuple or dict, pass logits_fn= to MemoryWrapper to pick the logits "
                "out of its output"
            )
        return memory_logits

    def check_model(self, inputs: torch.Tensor, *, num_classes: int | None = None) -> None:
        """Runs the model on one input now, to find an output the memory cannot use before
        training starts rather than at the first memory read (an epoch in).

        A call never runs the model before the memory holds something, so a model whose output
        is a tuple or dict (and no ``logits_fn``) would otherwise fail only then. The check runs
        in eval mode without gradient and with the random streams forked: no BatchNorm
        statistic, module flag or random stream changes, so training is unaffected.

        Args:
            inputs: a batch of inputs (its first row is used).
            num_classes: the number of classes the logits must have (default: any).

        Raises:
            TypeError: the output (through ``logits_fn``) is not 2-D floating-point logits; the
                message names ``logits_fn``.

        Example:
            >>> memory = MemoryWrapper(nn.Linear(2, 3), num_samples=4, sample_shape=(2,))
            >>> memory.check_model(torch.rand(8, 2), num_classes=3)
        """
        _check_clean(inputs, self.sample_shape)
        devices = [inputs.device] if inputs.device.type == "cuda" else []
        with torch.no_grad(), eval_mode(self._model), torch.random.fork_rng(devices=devices):
            output = self._model(inputs[:1].detach())
        self._as_logits(output, num_classes=num_classes)

    def _diagnose(self, read: MemoryRead, targets: torch.Tensor, *, num_classes: int) -> None:
        """Classifies every memory row read with the current model (eval mode, no gradient)."""
        devices = [read.examples.device] if read.examples.device.type == "cuda" else []
        with torch.no_grad(), eval_mode(self._model), torch.random.fork_rng(devices=devices):
            output = self._model(read.examples)
        predicted = self._as_logits(output, num_classes=num_classes).argmax(dim=1)
        labels = targets.index_select(0, read.sample_of_row.to(targets.device))
        correct = (predicted == labels.to(predicted.device)).cpu().numpy()
        fooled = (
            np.full(correct.shape, FOOLED_UNKNOWN, dtype=np.uint8)
            if read.slot_ids is None
            else self.store.fooled_at_write(read.slot_ids).numpy()
        )
        known = fooled != FOOLED_UNKNOWN
        self._counters.count(
            rows_classified=int(correct.size),
            rows_correct=int(correct.sum()),
            rows_seen_at_write=int(known.sum()),
            rows_forgotten=int(((fooled == 0) & ~correct).sum()),
            rows_recovered=int(((fooled == 1) & correct).sum()),
        )

    def _select_rows(self, read: MemoryRead) -> torch.Tensor:
        """The ``ceil(f * R)`` rows with the largest last weight (unseen first), in batch order."""
        assert read.slot_ids is not None  # a local store names its rows' slots
        keep = math.ceil(self.replay_fraction * read.num_rows)
        weights = self.store.last_weights(read.slot_ids).numpy()
        chosen = np.argsort(-weights, kind="stable")[:keep]  # stable: ties in batch order
        return torch.from_numpy(np.sort(chosen))

    def recall(
        self, indices: torch.Tensor, clean: torch.Tensor, *, view: View | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's newest stored example, to start this step's attack from.

        In mode ``"example"`` the example is projected into the eps-ball of the current ``clean``
        and ``[0, 1]`` when ``eps`` is set; in mode ``"perturbation"`` it is
        ``clip(clean + delta, 0, 1)``. A sample with no filled slot gets its ``clean`` row. No
        model call, no random numbers, and the memory and its counters are unchanged. The rows
        read are kept for the step's call with the same indices, which then reads (and, sharded,
        exchanges) nothing again. On a distributed memory every rank must call it, as the call.

        Args:
            indices: ``(B,)`` dataset indices, as for a call.
            clean: ``(B, *sample_shape)`` clean inputs.
            view: ``(offsets, flips)`` of the batch's views, with ``view_padding``.

        Returns:
            ``(start, found)``: ``(B, *sample_shape)`` on ``clean``'s device and dtype, and
            ``(B,)`` bool on ``clean``'s device (whether the sample had a stored example).

        Raises:
            TypeError, ValueError, IndexError: bad arguments, as for a call.

        Example:
            >>> model = nn.Linear(2, 2)
            >>> memory = MemoryWrapper(model, num_samples=4, sample_shape=(2,), eps=0.1)
            >>> x, y = torch.full((2, 2), 0.5), torch.tensor([0, 1])
            >>> _ = memory(torch.tensor([0, 1]), x, x + 0.05, model(x), y)
            >>> start, found = memory.recall(torch.tensor([1, 3]), x)
            >>> start.tolist(), found.tolist()
            ([[0.550000011920929, 0.550000011920929], [0.5, 0.5]], [True, False])
        """
        try:
            _check_clean(clean, self.sample_shape)
            index = check_indices(indices, batch_size=clean.shape[0], num_samples=self.num_samples)
            store_clean, _ = self._in_stored_frame(view, clean, clean)
        except (TypeError, ValueError, IndexError):
            self.store.abort()
            raise
        with torch.no_grad():
            start, found = self.store.recall(index, store_clean)
            if view is not None:
                size = (self.sample_shape[1], self.sample_shape[2])
                start = crop_flip(start, view[0], view[1], size)
            if self.mode == "example" and self.eps is not None:
                start = project_linf(start, clean.detach(), self.eps)
        return start, found.to(clean.device)

    def _zero(self, logits: torch.Tensor) -> torch.Tensor:
        self._counters.last_term = 0.0  # a float: stats() then needs no device sync for it
        # A fresh zero: adding it changes no value or gradient, and it can be backpropagated.
        return torch.zeros(
            (),
            dtype=torch.float32,
            device=logits.device,
            requires_grad=torch.is_grad_enabled() and logits.requires_grad,
        )

    # ------------------------------------------------------------------ statistics

    def _reset_counters(self) -> None:
        self._counters = Counters()
        self._window_start = self._counters.copy()
        self._warned_rejected = False
        self._warned_no_write = False
        self._warned_labels = False
        self._checked_coverage = False
        self._frozen = False

    def _count_write(self, rows: int, rejected: int) -> None:
        self._counters.count(rows_written=rows - rejected, rejected_rows=rejected)
        if rejected and not self._warned_rejected:
            self._warned_rejected = True
            warnings.warn(
                f"{rejected} row(s) of adv held NaN or Inf (or overflowed {dtype_name(self.dtype)})"
                " and were not stored; those samples keep their previous memory. Further rejected "
                "rows are counted in stats()['rejected_rows'] without another warning.",
                RuntimeWarning,
                stacklevel=3,
            )

    def stats(self) -> dict[str, Any]:
        """Counters since the memory was built (or loaded), for logging.

        Keys: ``calls``; ``terms_computed`` (calls that ran the memory forward pass);
        ``rows_read`` (memory examples that went through the model for the term);
        ``rows_skipped`` (filled rows that selective replay left out); ``rows_written``;
        ``rejected_rows`` (rows of adv not stored: NaN, Inf, overflow); the diagnostics
        ``rows_classified``, ``rows_correct``, ``rows_seen_at_write``, ``rows_forgotten``,
        ``rows_recovered`` and ``memory_accuracy`` (see ``diagnostics``); ``mean_term`` (mean
        over the calls that computed a term), ``mean_weight`` (mean weight of the rows read),
        ``last_term`` (what the last call returned); ``filled_fraction`` (filled slots over all
        slots) and ``nbytes``; a distributed memory adds its traffic. A mean is ``None`` where
        nothing was computed. Reading it synchronizes with the GPU once: call it when logging.
        """
        return {
            **self._counters.report(),
            "filled_fraction": self.store.filled_fraction(),
            "nbytes": self.nbytes,
            **self.store.stats(),
        }

    def epoch_stats(self) -> dict[str, Any]:
        """The counters of :meth:`stats` since the previous ``epoch_stats()`` call, then a new
        window starts (the first window starts when the memory is built or loaded).

        Call it once at the end of each epoch for per-epoch figures: ``mean_term`` is then that
        epoch's mean term, where :meth:`stats` averages over the whole run. Means are ``None``
        where the window computed none; ``filled_fraction`` is the current one.

        Example:
            >>> model = nn.Linear(2, 2)
            >>> memory = MemoryWrapper(model, num_samples=2, sample_shape=(2,))
            >>> x, y = torch.rand(2, 2), torch.tensor([0, 1])
            >>> _ = memory(torch.arange(2), x, x, model(x), y)
            >>> first = memory.epoch_stats()
            >>> first["calls"], first["mean_term"], memory.epoch_stats()["calls"]
            (1, None, 0)
        """
        report = self._counters.report(since=self._window_start)
        self._window_start = self._counters.copy()
        return {**report, "filled_fraction": self.store.filled_fraction()}

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
            "view_padding": self.view_padding,
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
            "counters": self._counters.state(),
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
        if version not in READABLE_FORMAT_VERSIONS:
            readable = ", ".join(map(str, READABLE_FORMAT_VERSIONS))
            raise ValueError(
                f"memory state has format_version {version!r}, this version reads {readable}"
            )
        config = state_dict.get("config")
        if not isinstance(config, dict):
            raise ValueError("memory state has no 'config' dict")
        mine = self.config()
        layout = [*self.store.config(), "view_padding"]
        keys = layout + (list(_LOSS_SETTINGS) if strict else [])
        mismatched = {k: (config.get(k), mine[k]) for k in keys if config.get(k) != mine[k]}
        if mismatched:
            details = ", ".join(
                f"{k}: saved {a!r} vs this memory {b!r}" for k, (a, b) in mismatched.items()
            )
            raise ValueError(f"memory state does not match this memory's configuration ({details})")
        counters = Counters.check_state(state_dict.get("counters"))
        previous, self.store.step = self.store.step, int(counters["calls"])
        try:
            self.store.load_state(state_dict)
        except BaseException:
            self.store.step = previous
            raise
        self._reset_counters()
        self._counters = Counters.from_state(counters)
        self._window_start = self._counters.copy()

    @property
    def step(self) -> int:
        """The memory's step: its calls so far (``stats()["calls"]``, saved in :meth:`state_dict`
        and memory files). A disk-backed memory records it with each write; reopened, it
        continues from the step of its last change."""
        return self.store.step

    def mark_checkpoint(self) -> int:
        """Marks the memory's current step as one a resumed run may return to; returns the step.

        Call it right after each checkpoint of the training is safely written (the checkpoint
        records :attr:`step`). A disk-backed memory then flushes its folder to the disk and, from
        now on, keeps in its undo log whatever each step overwrites (the old rows and
        bookkeeping), so that after a crash :meth:`rollback_to` returns it bit-identically to any
        step since this mark. The log grows by the rows overwritten since the mark (up to the
        rows written in one checkpoint interval, on the same disk) and each mark starts it
        afresh. A memory in RAM only returns its step: save it with the checkpoint instead.

        Example:
            >>> memory = MemoryWrapper(nn.Linear(2, 2), num_samples=4, sample_shape=(2,))
            >>> memory.mark_checkpoint()
            0
        """
        return self.store.mark()

    def rollback_to(self, step: int) -> None:
        """Returns a disk-backed memory to what it was at ``step`` (bit-identical), to resume a
        run from a checkpoint of that step.

        A reopened folder whose memory is ahead of its last mark warns with the number of steps.
        Any step from the last :meth:`mark_checkpoint` on can be restored; without a mark, the
        memory can step back over its last write only. On a distributed memory, call it on every
        rank with the same step.

        Args:
            step: the step of the checkpoint being resumed (:attr:`step` when it was written).

        Raises:
            ValueError: a memory in RAM (load the state saved with the checkpoint instead), a step
                after the memory's, or one before the oldest step it can restore. Nothing is
                changed.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise TypeError(f"step must be an int >= 0, got {step!r}")
        self.store.rollback_to(step)
        self._counters.counts["calls"] = step
        self._window_start = self._counters.copy()

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


def _check_adv_logits(adv_logits: object, logits: torch.Tensor) -> None:
    if not isinstance(adv_logits, torch.Tensor) or not adv_logits.is_floating_point():
        raise TypeError(
            f"adv_logits must be a floating-point tensor, got {type(adv_logits).__name__}"
        )
    if adv_logits.shape != logits.shape or adv_logits.device != logits.device:
        raise ValueError(
            f"adv_logits must have the shape and device of logits, {tuple(logits.shape)} on "
            f"{logits.device}; got {tuple(adv_logits.shape)} on {adv_logits.device}"
        )


def _seen_at_write(adv_logits: torch.Tensor, targets: torch.Tensor) -> SeenAtWrite:
    labels = targets.to(adv_logits.device).long()
    p_true = log_probs(adv_logits.detach()).gather(1, labels.view(-1, 1)).squeeze(1).exp()
    return SeenAtWrite(fooled=adv_logits.detach().argmax(dim=1) != labels, weight=1.0 - p_true)


def _check_clean(clean: object, sample_shape: tuple[int, ...]) -> None:
    if not isinstance(clean, torch.Tensor) or not clean.is_floating_point():
        raise TypeError(f"clean must be a floating-point tensor, got {type(clean).__name__}")
    if clean.dim() == 0 or tuple(clean.shape[1:]) != sample_shape:
        raise ValueError(
            f"clean has shape {tuple(clean.shape)}, expected (batch, *{tuple(sample_shape)})"
        )


def _difficulty(
    memory_logits: torch.Tensor, targets: torch.Tensor, read: MemoryRead
) -> torch.Tensor:
    """``1 - p_y`` of each memory row, whatever the term's weighting."""
    rows = read.sample_of_row.to(targets.device)
    labels = targets.index_select(0, rows).to(memory_logits.device).long().view(-1, 1)
    return 1.0 - log_probs(memory_logits.detach()).gather(1, labels).squeeze(1).exp()
