"""``TrainingHook``: the runtime side of the integration patches.

A patched repository keeps its own loop, attack and loss. The few lines the patch adds all call one
``TrainingHook`` object (named ``memloss`` in the patched code):

- ``memloss.add_arguments(parser)`` adds ``--beta-prime``, ``--mem-depth``, ``--mem-dtype``,
  ``--mem-weighting`` and a few more flags, and remembers their parsed values;
- ``memloss.indexed(loader)`` returns a loader over the same data, in the same order and with the
  same random stream, whose batches also carry dataset indices; ``memloss.tracked(loader)`` is the
  same loader with batches left as they were, the hook keeping each batch's indices aside;
- ``memloss.record(adv, logits)`` is called inside the repository's loss function, where its own
  adversarial examples and clean logits are;
- ``memloss.term(model, idx, x, y)`` returns the MemLoss term for the recorded step (the memory is
  built on first use, sized from the loader and the batch); ``adv=`` and ``logits=`` pass the step's
  tensors directly, and without clean logits (PGD-AT) the hook computes them only when the term
  needs them;
- ``memloss.attack_init(x, start, eps)`` (``--mem-attack-init``) starts the repository's attack
  from each sample's stored example where it has one;
- ``memloss.save(path, epoch=...)`` / ``memloss.resume(path)`` keep the memory next to the model's
  checkpoints.

With ``--beta-prime 0`` the term is an exact zero, and the memory runs no forward pass and draws no
random numbers, so the repository prints the same losses as without the patch.
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..checks import check_choice
from ..data import IndexedDataset
from ..memory import MemoryWrapper
from ..model_state import frozen_running_stats
from ..options import STORAGE_DTYPE_NAMES, WEIGHTINGS, StorageDtypeName, Weighting
from ..store import STORAGE_DTYPES
from ..store.files import atomic_write

__all__ = ["HookSettings", "TrainingHook", "keep_cuda_calls_on_cpu"]

_LOG = logging.getLogger(__name__)

# int8 stores perturbations only, which the patched repositories do not use.
_DTYPE_CHOICES = tuple(name for name in STORAGE_DTYPE_NAMES if name != "int8")
_CHECKPOINT_KEY = "memloss_memory"

# Why an option a patch names as unsupported cannot be combined with the memory.
_UNSUPPORTED_REASONS = {
    "mixup": "a mixed-up input has no single dataset index or label to keep a memory for",
    "attack": "the repository trains on clean inputs with it, so there is no adversarial example "
    "to keep",
}


@dataclass(frozen=True, kw_only=True)
class HookSettings:
    """Memory settings, as read from the command line.

    Args:
        beta_prime: weight of the MemLoss term (0 turns it off; the memory still stores).
        depth: stored examples per sample.
        dtype: storage dtype name.
        weighting: per-example weight of the term.
        eps: L-inf radius of the repository's attack, needed by the uint8 store only.
        device: where the memory lives; ``None`` keeps it on the training batch's device.
        resume: a memory checkpoint to load when the memory is built.
        attack_init: start the repository's attack from each sample's stored example
            (:meth:`TrainingHook.attack_init`); samples without one keep the repository's start.

    Raises:
        ValueError: an unknown ``dtype`` or ``weighting``.

    Example:
        >>> HookSettings(beta_prime=0.0, dtype="uint8", eps=8 / 255).dtype
        'uint8'
    """

    beta_prime: float = 2.0
    depth: int = 1
    dtype: StorageDtypeName = "float32"
    weighting: Weighting = "difficulty"
    eps: float | None = None
    device: str | None = None
    resume: str | None = None
    attack_init: bool = False

    def __post_init__(self) -> None:
        check_choice("dtype", self.dtype, _DTYPE_CHOICES)
        check_choice("weighting", self.weighting, WEIGHTINGS)


class TrainingHook:
    """Connects a repository's training loop to a :class:`~memloss_addon.MemoryWrapper`.

    Args:
        settings: initial settings; :meth:`add_arguments` replaces them with the parsed flags.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> hook = TrainingHook(settings=HookSettings(beta_prime=2.0))
        >>> data = TensorDataset(torch.rand(6, 3), torch.tensor([0, 1, 2, 0, 1, 2]))
        >>> loader = hook.indexed(DataLoader(data, batch_size=3))
        >>> model = torch.nn.Linear(3, 3)
        >>> x, y, idx = next(iter(loader))
        >>> hook.record(x.clamp(0, 1), model(x))  # inside the repository's loss function
        >>> hook.term(model, idx, x, y).item()  # first epoch: nothing stored yet
        0.0
    """

    def __init__(self, *, settings: HookSettings | None = None) -> None:
        self.settings = settings if settings is not None else HookSettings()
        self._memory: MemoryWrapper | None = None
        self._num_samples: int | None = None
        self._recorded: tuple[torch.Tensor, torch.Tensor] | None = None
        self._indexed_loaders: dict[tuple[int, bool], tuple[DataLoader, DataLoader]] = {}
        self._resume_state: Mapping[str, Any] | None = None
        self._current_idx: torch.Tensor | None = None

    # ------------------------------------------------------------------ command line

    def add_arguments(
        self,
        parser: argparse.ArgumentParser,
        *,
        unsupported: Mapping[str, Sequence[object]] | None = None,
    ) -> None:
        """Adds the memory flags to ``parser`` and captures their values when it parses.

        Args:
            parser: the repository's argument parser, before it parses.
            unsupported: repository options (by their ``dest``) and the values the memory cannot
                work with: parsing them exits with an error naming the option, unless the memory
                is off (``--beta-prime 0`` without ``--mem-attack-init``).
        """
        group = parser.add_argument_group("MemLoss memory")
        group.add_argument(
            "--beta-prime",
            type=float,
            default=2.0,
            help="weight of the MemLoss term (0 reproduces the base method)",
        )
        group.add_argument(
            "--mem-depth",
            type=int,
            default=1,
            help="stored adversarial examples per training sample",
        )
        group.add_argument(
            "--mem-dtype",
            choices=_DTYPE_CHOICES,
            default="float32",
            help="storage dtype of the memory",
        )
        group.add_argument(
            "--mem-weighting",
            choices=WEIGHTINGS,
            default="difficulty",
            help="per-example weight of the term",
        )
        group.add_argument(
            "--mem-eps",
            type=float,
            default=None,
            help="attack radius, used by --mem-dtype uint8 to re-project",
        )
        group.add_argument(
            "--mem-device",
            default=None,
            help="where the memory lives (default: the training batch's device)",
        )
        group.add_argument(
            "--mem-resume", default=None, help="memory checkpoint to load when training starts"
        )
        group.add_argument(
            "--mem-attack-init",
            action="store_true",
            help="start the attack from each sample's stored example (where it has one)",
        )
        refused = dict(unsupported or {})
        parse_known_args = parser.parse_known_args

        def capture(*args: Any, **kwargs: Any) -> tuple[argparse.Namespace, list[str]]:
            namespace, rest = parse_known_args(*args, **kwargs)
            self.settings = HookSettings(
                beta_prime=namespace.beta_prime,
                depth=namespace.mem_depth,
                dtype=namespace.mem_dtype,
                weighting=namespace.mem_weighting,
                eps=namespace.mem_eps,
                device=namespace.mem_device,
                resume=namespace.mem_resume,
                attack_init=namespace.mem_attack_init,
            )
            problem = _unsupported_option(namespace, refused, self.settings)
            if problem is not None:
                parser.error(problem)
            if namespace.mem_resume is not None:
                self.resume(namespace.mem_resume)
            return namespace, rest

        # ``parse_args`` goes through ``parse_known_args``; wrapping this one parser instance
        # captures the values without another edit to the repository.
        parser.parse_known_args = capture  # type: ignore[method-assign,assignment]

    # ------------------------------------------------------------------ data

    def indexed(self, loader: DataLoader) -> DataLoader:
        """Returns a loader over ``IndexedDataset(loader.dataset)`` that batches like ``loader``.

        The new loader shares ``loader``'s batch sampler, so it visits the samples in the same
        order and draws the same random numbers; only the batches gain a third field, the
        dataset indices. Calling it again with the same loader returns the same object. The hook
        also keeps each batch's indices while it is being trained on, for :meth:`attack_init`
        and for :meth:`term` called without indices.

        Args:
            loader: the repository's training loader (map-style dataset).

        Returns:
            The indexed loader.
        """
        return self._wrap(loader, keep_indices=True)

    def tracked(self, loader: DataLoader) -> DataLoader:
        """Like :meth:`indexed`, but the batches stay as ``loader`` makes them.

        For loops whose unpacking a patch would otherwise have to change (a wrapper class that
        iterates ``loader`` itself, say): each batch's dataset indices are kept by the hook, and
        :meth:`term` (with ``idx=None``) and :meth:`attack_init` use them.

        Args:
            loader: the repository's training loader (map-style dataset).

        Returns:
            A loader with the same batches, order and random stream as ``loader``.
        """
        return self._wrap(loader, keep_indices=False)

    def _wrap(self, loader: DataLoader, *, keep_indices: bool) -> DataLoader:
        if not isinstance(loader, DataLoader):
            raise TypeError(f"indexed() needs a torch DataLoader, got {type(loader).__name__}")
        cached = self._indexed_loaders.get((id(loader), keep_indices))
        if cached is not None and cached[0] is loader:
            return cached[1]
        extra: dict[str, Any] = {}
        if loader.num_workers > 0:
            extra["prefetch_factor"] = loader.prefetch_factor
            extra["persistent_workers"] = loader.persistent_workers
        indexed = _IndexedLoader(
            IndexedDataset(loader.dataset),
            batch_sampler=loader.batch_sampler,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
            timeout=loader.timeout,
            worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context,
            generator=loader.generator,
            **extra,
        )
        indexed.memloss_hook = self
        indexed.memloss_keep_indices = keep_indices
        self._indexed_loaders[(id(loader), keep_indices)] = (loader, indexed)
        self._num_samples = len(loader.dataset)  # type: ignore[arg-type]  # map-style
        return indexed

    def _set_current(self, idx: torch.Tensor | None) -> None:
        self._current_idx = idx

    # ------------------------------------------------------------------ the term

    def record(self, adv: torch.Tensor, logits: torch.Tensor) -> None:
        """Keeps this step's adversarial examples and clean logits (with their graph).

        Args:
            adv: the adversarial examples the repository trains on, shape ``(B, *sample_shape)``.
            logits: the model's logits on the clean batch, in the training pass.
        """
        self._recorded = (adv, logits)

    def term(
        self,
        model: nn.Module,
        idx: torch.Tensor | None,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        metrics: dict[str, Any] | None = None,
        adv: torch.Tensor | None = None,
        logits: torch.Tensor | None = None,
        preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Returns the MemLoss term of this step and stores its adversarial examples.

        The step's adversarial examples and clean logits come from :meth:`record`, or from
        ``adv`` and ``logits``. Given ``adv`` without clean logits (a loss with no clean term,
        such as PGD-AT's), the hook runs the clean forward pass itself, in the model's current
        modes with BatchNorm running statistics frozen, and only when the term needs it: never
        with ``beta_prime=0`` and never for a batch none of whose samples has a stored example.

        The call always stores (``write=True``): it is made in the training step, whatever mode
        the repository left the model in.

        Args:
            model: the model being trained (bound to the memory on the first call).
            idx: dataset indices of the batch (from :meth:`indexed`); ``None`` takes those the
                loader from :meth:`tracked` or :meth:`indexed` yielded last.
            x: the clean batch, as the repository's attack sees it (before ``preprocess``).
            y: the labels.
            metrics: a repository's per-batch metrics; its ``"loss"`` entry gains the term.
            adv: this step's adversarial examples, instead of the recorded ones.
            logits: the clean logits (with their graph), instead of the recorded ones.
            preprocess: what the repository applies to an input before the model (its
                normalisation, say); the memory then runs ``model(preprocess(example))``. Fixed
                by the first call.

        Returns:
            A 0-dim float32 tensor with graph (exactly 0 with ``beta_prime=0`` or an empty memory).

        Raises:
            RuntimeError: nothing was recorded or passed for this step, or no indices are known.
        """
        if adv is None:
            if self._recorded is None:
                raise RuntimeError(
                    "memloss: no adversarial examples were recorded for this step; the patched "
                    "loss function must call memloss.record(adv, logits) before memloss.term(...)"
                )
            adv, recorded_logits = self._recorded
            logits = recorded_logits if logits is None else logits
        self._recorded = None
        if idx is None:
            idx = self._current_idx
            if idx is None:
                raise RuntimeError(
                    "memloss: no dataset indices for this step; iterate the training loader "
                    "through memloss.tracked(loader) or memloss.indexed(loader)"
                )
        self._current_idx = None
        if self._memory is None:
            self._memory = self._build(self._bound_model(model, preprocess), x)
        memory = self._memory
        if logits is None:
            logits = self._clean_logits(memory, idx, x, y)
        term = memory(idx, x, adv, logits, y, write=True)
        if metrics is not None and "loss" in metrics:
            metrics["loss"] = metrics["loss"] + term.item()
        return term

    def _bound_model(
        self, model: nn.Module, preprocess: Callable[[torch.Tensor], torch.Tensor] | None
    ) -> nn.Module:
        if preprocess is None:
            return model
        return _Preprocessed(model, preprocess)

    def _clean_logits(
        self, memory: MemoryWrapper, idx: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """The clean logits when the term needs them, else a placeholder the memory never reads.

        The placeholder only carries the batch size, device and (for CPU labels, which the memory
        range-checks) enough classes; with ``beta_prime=0`` or no stored example in the batch the
        memory returns an exact zero without reading it.
        """
        if memory.beta_prime != 0.0:
            # The rows recalled here are kept for the call that follows: they are read once.
            _, found = memory.recall(idx, x)
            if bool(found.any()):
                with frozen_running_stats(memory.model):
                    return memory.model(x)
        classes = int(y.max()) + 1 if y.device.type == "cpu" and y.numel() else 1
        dtype = x.dtype if x.is_floating_point() else torch.float32
        return torch.zeros((y.shape[0], classes), dtype=dtype, device=x.device)

    def attack_init(
        self,
        x: torch.Tensor,
        start: torch.Tensor,
        eps: float,
        *,
        norm: Literal["l_inf", "l_2"] = "l_inf",
        delta: bool = False,
    ) -> torch.Tensor:
        """The attack's start: each sample's stored example where it has one, else ``start``.

        Does nothing (returns ``start`` itself) unless ``--mem-attack-init`` is set, the memory
        exists and the loader from :meth:`tracked` or :meth:`indexed` is in the middle of a
        training batch of ``x``'s size. A stored example is moved into the ``eps``-ball around
        the current ``x`` (L-inf: clamped per pixel; L2: rescaled) and into ``[0, 1]``. Draws no
        random numbers and leaves the memory unchanged.

        Args:
            x: the clean batch the attack perturbs.
            start: the repository's own start for it (an input, or a perturbation with
                ``delta=True``).
            eps: the attack's radius.
            norm: the attack's norm.
            delta: ``start`` (and the result) is a perturbation ``x_adv - x``.

        Returns:
            A tensor like ``start``.
        """
        memory, idx = self._memory, self._current_idx
        if not self.settings.attack_init or memory is None or idx is None:
            return start
        if idx.shape[0] != x.shape[0]:
            return start
        with torch.no_grad():
            recalled, found = memory.recall(idx, x)
            if not bool(found.any()):
                return start
            clean = x.detach()
            move = recalled.to(clean.dtype) - clean
            if norm == "l_inf":
                move = move.clamp(-eps, eps)
            elif norm == "l_2":
                move = move.flatten(1).renorm(p=2, dim=0, maxnorm=eps).view_as(move)
            else:
                raise ValueError(f"norm must be 'l_inf' or 'l_2', got {norm!r}")
            chosen = (clean + move).clamp(0, 1)
            if delta:
                chosen = chosen - clean
            mask = found.to(start.device).view(-1, *([1] * (start.dim() - 1)))
            return torch.where(mask, chosen.to(start.dtype), start.detach())

    @property
    def memory(self) -> MemoryWrapper | None:
        """The memory, once the first :meth:`term` call has built it."""
        return self._memory

    def _build(self, model: nn.Module, x: torch.Tensor) -> MemoryWrapper:
        if self._num_samples is None:
            raise RuntimeError(
                "memloss: the training loader was not wrapped with memloss.indexed(loader), so "
                "the number of training samples is unknown"
            )
        settings = self.settings
        memory = MemoryWrapper(
            model,
            num_samples=self._num_samples,
            sample_shape=tuple(x.shape[1:]),
            beta_prime=settings.beta_prime,
            depth=settings.depth,
            weighting=settings.weighting,
            dtype=STORAGE_DTYPES[settings.dtype],
            device=settings.device if settings.device is not None else x.device,
            eps=settings.eps,
        )
        if self._resume_state is not None:
            memory.load_state_dict(dict(self._resume_state))
            self._resume_state = None
        return memory

    # ------------------------------------------------------------------ checkpoints

    def save(self, path: str | os.PathLike[str], *, epoch: int | None = None) -> None:
        """Writes the memory to ``path`` atomically (nothing is written before the first step).

        Args:
            path: the checkpoint file, usually next to the model's.
            epoch: the epoch this memory belongs to, checked by :meth:`resume`.
        """
        if self._memory is None:
            _LOG.info("memloss: no memory to save yet (%s)", path)
            return
        payload = {_CHECKPOINT_KEY: self._memory.state_dict(), "epoch": epoch}
        # A crash mid-save never leaves a truncated checkpoint.
        with atomic_write(path) as file:
            torch.save(payload, file)

    def resume(self, path: str | os.PathLike[str], *, epoch: int | None = None) -> None:
        """Loads a memory checkpoint written by :meth:`save`.

        A missing file only warns: training then starts with an empty memory, as in epoch 1.

        Args:
            path: the memory checkpoint.
            epoch: the epoch of the model checkpoint being resumed; a different epoch in the
                memory checkpoint warns.
        """
        if not os.path.exists(path):
            warnings.warn(
                f"memloss: memory checkpoint {os.fspath(path)!r} not found; the memory starts "
                "empty",
                stacklevel=2,
            )
            return
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, Mapping) or _CHECKPOINT_KEY not in payload:
            raise ValueError(f"{os.fspath(path)!r} is not a memory checkpoint written by save()")
        saved_epoch = payload.get("epoch")
        if epoch is not None and saved_epoch is not None and saved_epoch != epoch:
            warnings.warn(
                f"memloss: memory checkpoint is from epoch {saved_epoch}, the model from epoch "
                f"{epoch}",
                stacklevel=2,
            )
        if self._memory is not None:
            self._memory.load_state_dict(dict(payload[_CHECKPOINT_KEY]))
        else:
            self._resume_state = payload[_CHECKPOINT_KEY]


class _IndexedLoader(DataLoader):
    """A DataLoader over an ``IndexedDataset`` that tells its hook each batch's indices.

    With ``memloss_keep_indices`` false the indices are taken off the batches, which then look
    exactly like those of the wrapped loader.
    """

    memloss_hook: TrainingHook
    memloss_keep_indices: bool

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        hook, keep = self.memloss_hook, self.memloss_keep_indices
        try:
            for batch in super().__iter__():
                if isinstance(batch, Mapping):
                    hook._set_current(batch["index"])
                    if not keep:
                        batch = {key: value for key, value in batch.items() if key != "index"}
                else:
                    hook._set_current(batch[-1])
                    if not keep:
                        batch = batch[:-1]
                yield batch
        finally:
            hook._set_current(None)  # an evaluation pass after the loop never sees stale indices


class _Preprocessed(nn.Module):
    """``model(preprocess(x))``: what the memory runs when the repository normalises inputs."""

    def __init__(
        self, model: nn.Module, preprocess: Callable[[torch.Tensor], torch.Tensor]
    ) -> None:
        super().__init__()
        self.model = model
        self.preprocess = preprocess

    def forward(self, x: torch.Tensor) -> Any:
        return self.model(self.preprocess(x))


def _unsupported_option(
    namespace: argparse.Namespace,
    refused: Mapping[str, Sequence[object]],
    settings: HookSettings,
) -> str | None:
    """The error for the first parsed option the memory cannot work with, if the memory is on."""
    if settings.beta_prime == 0 and not settings.attack_init:
        return None
    for name, values in refused.items():
        value = getattr(namespace, name, None)
        if value is None or not any(value == bad for bad in values):
            continue
        flag = "--" + name.replace("_", "-")
        shown = flag if value is True else f"{flag} {value}"
        reason = _UNSUPPORTED_REASONS.get(name, "the patch was not made for it")
        return (
            f"memloss: {shown} is not supported with MemLoss ({reason}); train without it, or "
            "turn the memory off with --beta-prime 0 (and no --mem-attack-init)"
        )
    return None


def keep_cuda_calls_on_cpu() -> Callable[[], None]:
    """Makes ``Tensor.cuda()`` return the tensor unchanged on a machine without CUDA.

    For repositories whose loss calls ``.cuda()`` in more places than a small patch should edit.
    Where CUDA is available nothing changes; where it is not, those calls would fail anyway.

    Returns:
        A function that restores the previous ``Tensor.cuda``.

    Example:
        >>> import torch
        >>> undo = keep_cuda_calls_on_cpu()
        >>> x = torch.zeros(2)
        >>> x.cuda().device.type == ("cuda" if torch.cuda.is_available() else "cpu")
        True
        >>> undo()
    """
    previous = torch.Tensor.cuda
    if torch.cuda.is_available():
        return lambda: None

    def cuda_on_cpu(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return tensor

    torch.Tensor.cuda = cuda_on_cpu  # type: ignore[method-assign,assignment]

    def undo() -> None:
        torch.Tensor.cuda = previous  # type: ignore[method-assign]

    return undo
