"""``TrainingHook``: the runtime side of the integration patches.

A patched repository keeps its own loop, attack and loss. The few lines the patch adds all call one
``TrainingHook`` object (named ``memloss`` in the patched code):

- ``memloss.add_arguments(parser)`` adds ``--beta-prime``, ``--mem-depth``, ``--mem-dtype``,
  ``--mem-weighting`` and a few more flags, and remembers their parsed values;
- ``memloss.indexed(loader)`` returns a loader over the same data, in the same order and with the
  same random stream, whose batches also carry dataset indices;
- ``memloss.record(adv, logits)`` is called inside the repository's loss function, where its own
  adversarial examples and clean logits are;
- ``memloss.term(model, idx, x, y)`` returns the MemLoss term for the recorded step (the memory is
  built on first use, sized from the loader and the batch);
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..checks import check_choice
from ..data import IndexedDataset
from ..memory import MemoryWrapper
from ..options import STORAGE_DTYPE_NAMES, WEIGHTINGS, StorageDtypeName, Weighting
from ..store import STORAGE_DTYPES
from ..store.files import atomic_write

__all__ = ["HookSettings", "TrainingHook", "keep_cuda_calls_on_cpu"]

_LOG = logging.getLogger(__name__)

# int8 stores perturbations only, which the patched repositories do not use.
_DTYPE_CHOICES = tuple(name for name in STORAGE_DTYPE_NAMES if name != "int8")
_CHECKPOINT_KEY = "memloss_memory"


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
        self._indexed_loaders: dict[int, tuple[DataLoader, DataLoader]] = {}
        self._resume_state: Mapping[str, Any] | None = None

    # ------------------------------------------------------------------ command line

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Adds the memory flags to ``parser`` and captures their values when it parses.

        Args:
            parser: the repository's argument parser, before it parses.
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
            )
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
        dataset indices. Calling it again with the same loader returns the same object.

        Args:
            loader: the repository's training loader (map-style dataset).

        Returns:
            The indexed loader.
        """
        if not isinstance(loader, DataLoader):
            raise TypeError(f"indexed() needs a torch DataLoader, got {type(loader).__name__}")
        cached = self._indexed_loaders.get(id(loader))
        if cached is not None and cached[0] is loader:
            return cached[1]
        extra: dict[str, Any] = {}
        if loader.num_workers > 0:
            extra["prefetch_factor"] = loader.prefetch_factor
            extra["persistent_workers"] = loader.persistent_workers
        indexed = DataLoader(
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
        self._indexed_loaders[id(loader)] = (loader, indexed)
        self._num_samples = len(loader.dataset)  # type: ignore[arg-type]  # map-style
        return indexed

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
        idx: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        metrics: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """Returns the MemLoss term of the recorded step and stores its adversarial examples.

        Args:
            model: the model being trained (bound to the memory on the first call).
            idx: dataset indices of the batch (from :meth:`indexed`).
            x: the clean batch.
            y: the labels.
            metrics: a repository's per-batch metrics; its ``"loss"`` entry gains the term.

        Returns:
            A 0-dim float32 tensor with graph (exactly 0 with ``beta_prime=0`` or an empty memory).

        Raises:
            RuntimeError: the loss function recorded nothing since the last call.
        """
        if self._recorded is None:
            raise RuntimeError(
                "memloss: no adversarial examples were recorded for this step; the patched loss "
                "function must call memloss.record(adv, logits) before memloss.term(...)"
            )
        adv, logits = self._recorded
        self._recorded = None
        if self._memory is None:
            self._memory = self._build(model, x)
        term = self._memory(idx, x, adv, logits, y)
        if metrics is not None and "loss" in metrics:
            metrics["loss"] = metrics["loss"] + term.item()
        return term

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
