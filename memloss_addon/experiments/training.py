"""Training with any reference objective, with or without MemLoss, with checkpoint and resume.

A :class:`TrainingRun` owns the model, the SGD optimizer and its per-batch learning-rate schedule,
the optional :class:`~memloss_addon.MemoryWrapper`, the frozen helper model HAT needs, and the
epoch counter. It saves all of that, plus the RNG states, into one file after every epoch
(atomically: a crash mid-write leaves the previous checkpoint intact) and resumes from it so that an
interrupted run continues exactly as an uninterrupted one would (bit-identical on CPU).

Shuffling draws from a generator seeded by ``(seed, epoch)``, so the data order never depends on
how many random numbers the attacks drew; the attacks' random starts draw from the global torch
RNG, whose state is checkpointed.

Settings per method (:data:`METHOD_RECIPES`) follow each method's reference recipe: momentum 0.9;
weight decay 5e-4 (PGD-AT, HAT, ST, single-step), 2e-4 (TRADES), 3.5e-3 (MART, its ResNet-18
value); Nesterov and a one-cycle schedule for HAT; otherwise the learning rate drops tenfold at 50%
and again at 75% of the epochs (PGD-AT's milestones, scaled to the run's length). One base learning
rate serves all methods, so that a short run on small data is comparable across them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from memloss_addon.experiments.datasets import DatasetSplits
from memloss_addon.experiments.models import ModelName, build_model, default_model
from memloss_addon.memory import MemoryWrapper
from memloss_addon.store import STORAGE_DTYPES
from memloss_addon.store.files import atomic_write

__all__ = [
    "METHOD_NAMES",
    "METHOD_RECIPES",
    "CHECKPOINT_FORMAT",
    "MethodName",
    "MethodRecipe",
    "TrainConfig",
    "EpochStats",
    "TrainingRun",
    "clean_accuracy",
    "save_checkpoint",
    "load_checkpoint",
]

logger = logging.getLogger(__name__)

MethodName = Literal["pgd_at", "trades", "mart", "hat", "squeeze", "single_step"]
METHOD_NAMES: tuple[str, ...] = get_args(MethodName)
MemoryDtype = Literal["float32", "float16", "bfloat16", "uint8", "int8"]
CHECKPOINT_FORMAT = "memloss-training-checkpoint/1"


@dataclass(frozen=True)
class MethodRecipe:
    """A method's usual optimiser settings and loss weight.

    Attributes:
        weight_decay: SGD weight decay.
        nesterov: Whether SGD uses Nesterov momentum.
        schedule: ``"piecewise"`` (x0.1 at 50% and 75% of the steps) or ``"onecycle"``.
        beta: The method's regularizer weight (TRADES/MART/HAT/ST beta, single-step lambda);
            ``None`` for PGD-AT, which has none.
    """

    weight_decay: float
    nesterov: bool
    schedule: Literal["piecewise", "onecycle"]
    beta: float | None


METHOD_RECIPES: dict[str, MethodRecipe] = {
    "pgd_at": MethodRecipe(weight_decay=5e-4, nesterov=False, schedule="piecewise", beta=None),
    "trades": MethodRecipe(weight_decay=2e-4, nesterov=False, schedule="piecewise", beta=6.0),
    "mart": MethodRecipe(weight_decay=3.5e-3, nesterov=False, schedule="piecewise", beta=5.0),
    "hat": MethodRecipe(weight_decay=5e-4, nesterov=True, schedule="onecycle", beta=2.5),
    "squeeze": MethodRecipe(weight_decay=5e-4, nesterov=False, schedule="piecewise", beta=6.0),
    "single_step": MethodRecipe(weight_decay=5e-4, nesterov=False, schedule="piecewise", beta=1.0),
}


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything that determines a training run; ``None`` fields take the method's default.

    Attributes:
        method: Base objective, one of :data:`METHOD_NAMES`.
        epochs: Adversarial training epochs.
        batch_size: Training batch size.
        lr: Base (for HAT: peak) learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay (``None``: the method's).
        eps: L-inf radius in ``[0, 1]`` pixel units.
        step_size: Attack step (``None``: ``eps / 4``; single-step: ``1.25 * eps``).
        steps: Attack steps (single-step always uses one).
        beta: Regularizer weight (``None``: the method's, see :data:`METHOD_RECIPES`).
        hat_h: HAT's helper-example distance h.
        hat_gamma: HAT's helper-loss weight gamma.
        helper_epochs: Epochs of plain cross-entropy training for HAT's helper model.
        memory: Whether to add the MemLoss term.
        beta_prime: MemLoss weight beta'.
        depth: Memory depth K (examples kept per sample).
        weighting: ``"difficulty"`` (1 - p_y of the memory example) or ``"none"``.
        memory_dtype: Storage dtype of the memory.
        memory_mode: ``"example"`` stores adversarial examples, ``"perturbation"`` stores deltas.
        bn_mode: BatchNorm policy of the memory's forward pass.
        memory_device: Where the memory lives.
        device: Where the model trains.
        seed: Seed of initialisation, shuffling and attacks.
        model: Model name (``None``: the one that suits the dataset).
    """

    method: MethodName
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float | None = None
    eps: float = 0.1
    step_size: float | None = None
    steps: int = 10
    beta: float | None = None
    hat_h: float = 2.0
    hat_gamma: float = 0.5
    helper_epochs: int = 5
    memory: bool = False
    beta_prime: float = 2.0
    depth: int = 1
    weighting: Literal["difficulty", "none"] = "difficulty"
    memory_dtype: MemoryDtype = "float32"
    memory_mode: Literal["example", "perturbation"] = "example"
    bn_mode: Literal["train", "frozen", "eval"] = "train"
    memory_device: str = "cpu"
    device: str = "cpu"
    seed: int = 0
    model: ModelName | None = None

    def __post_init__(self) -> None:
        if self.method not in METHOD_NAMES:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHOD_NAMES}")
        for name in ("epochs", "batch_size", "steps", "depth"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        if self.helper_epochs < 0:
            raise ValueError(f"helper_epochs must be >= 0, got {self.helper_epochs!r}")
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise ValueError(f"eps must be a positive number, got {self.eps!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if self.memory_dtype not in get_args(MemoryDtype):
            raise ValueError(
                f"memory_dtype must be one of {get_args(MemoryDtype)}, got {self.memory_dtype!r}"
            )

    @property
    def recipe(self) -> MethodRecipe:
        """The method's usual settings."""
        return METHOD_RECIPES[self.method]

    @property
    def resolved_weight_decay(self) -> float:
        """Weight decay in use."""
        return self.recipe.weight_decay if self.weight_decay is None else self.weight_decay

    @property
    def resolved_beta(self) -> float | None:
        """Regularizer weight in use (``None`` for PGD-AT)."""
        return self.recipe.beta if self.beta is None else self.beta

    @property
    def resolved_steps(self) -> int:
        """Attack steps in use (one for single-step training)."""
        return 1 if self.method == "single_step" else self.steps

    @property
    def resolved_step_size(self) -> float:
        """Attack step size in use."""
        if self.step_size is not None:
            return self.step_size
        # Single-step: the FGSM-with-random-start step of Wong et al. (1.25 eps).
        return 1.25 * self.eps if self.method == "single_step" else self.eps / 4

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict of primitives (what checkpoints and results.json store)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Rebuild from :meth:`to_dict`'s output; unknown keys raise ``ValueError``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training config keys: {unknown}")
        return cls(**values)


@dataclass(frozen=True)
class EpochStats:
    """What one epoch reports.

    Attributes:
        epoch: Epochs completed (1-based).
        loss: Mean base-objective loss per sample.
        memory_term: Mean MemLoss term per sample (0 without memory or in the first epoch).
        train_clean_accuracy: Accuracy of the clean logits seen during training.
        test_clean_accuracy: Clean accuracy on the test set after the epoch.
        lr: Learning rate at the end of the epoch.
        seconds: Wall-clock time of the epoch.
    """

    epoch: int
    loss: float
    memory_term: float
    train_clean_accuracy: float
    test_clean_accuracy: float
    lr: float
    seconds: float


@torch.no_grad()
def clean_accuracy(model: nn.Module, loader: Iterable, *, device: str | torch.device) -> float:
    """Accuracy of ``model`` (in eval mode) on a loader of ``(x, y, ...)``; the mode is restored.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> model = nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.eye(2)), model.bias.zero_()
        >>> data = TensorDataset(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
        >>> clean_accuracy(model, DataLoader(data, batch_size=2), device="cpu")
        0.5
    """
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for batch in loader:
            x, y = batch[0].to(device), batch[1].to(device)
            correct += int((model(x).argmax(dim=1) == y).sum())
            total += len(y)
    finally:
        model.train(was_training)
    return correct / max(total, 1)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` with ``torch.save`` atomically (temp file, fsync, rename), creating folders.

    A crash mid-write leaves any previous file at ``path`` intact.

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "run" / "ckpt.pt"
        >>> save_checkpoint({"epoch": 3}, target)
        >>> torch.load(target, weights_only=True)["epoch"]
        3
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as handle:
        torch.save(state, handle)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a training checkpoint safely (``weights_only=True``, onto the CPU) and check its format.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is not a checkpoint written by :class:`TrainingRun`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"{str(path)!r} is not a memloss training checkpoint "
            f"(format {found!r}, expected {CHECKPOINT_FORMAT!r})"
        )
    return state


def _objective(method: str) -> Callable[..., Any]:
    from memloss_addon import objectives

    return getattr(objectives, method)


def _torch_dtype(name: str) -> torch.dtype:
    return STORAGE_DTYPES[name]


class TrainingRun:
    """One training run: model, optimiser, schedule, memory, helper and epoch counter.

    Building a run seeds the global torch and Python generators with ``config.seed`` (the model's
    initialisation and the attacks' random starts draw from them), which is what makes a run
    reproducible from its config alone.

    Args:
        config: The run's settings.
        splits: The dataset (its training set yields ``(x, y, idx)``).

    Example:
        >>> from memloss_addon.experiments.datasets import load_digits
        >>> splits = load_digits()
        >>> config = TrainConfig(method="pgd_at", epochs=1, steps=1, memory=True)
        >>> run = TrainingRun(config, splits)
        >>> run.epoch, run.memory is not None
        (0, True)
    """

    def __init__(self, config: TrainConfig, splits: DatasetSplits) -> None:
        self.config = config
        self.splits = splits
        self.device = torch.device(config.device)
        self.model_name: ModelName = config.model or default_model(splits.sample_shape)
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        shape = splits.sample_shape
        self.model = build_model(
            self.model_name, sample_shape=shape, num_classes=splits.num_classes
        ).to(self.device)
        self.helper: nn.Module | None = None
        self.helper_trained = False
        if config.method == "hat":
            self.helper = build_model(
                self.model_name, sample_shape=shape, num_classes=splits.num_classes
            ).to(self.device)
        self.steps_per_epoch = len(self._loader(0))
        self.optimizer = self._make_optimizer(self.model, nesterov=config.recipe.nesterov)
        self.scheduler = self._make_scheduler(
            self.optimizer, config.recipe.schedule, config.epochs * self.steps_per_epoch
        )
        self.memory = self._make_memory() if config.memory else None
        self.epoch = 0
        self.history: list[dict[str, float]] = []

    # -- construction -------------------------------------------------------------------------

    def _make_optimizer(self, model: nn.Module, *, nesterov: bool) -> torch.optim.SGD:
        return torch.optim.SGD(
            model.parameters(),
            lr=self.config.lr,
            momentum=self.config.momentum,
            weight_decay=self.config.resolved_weight_decay,
            nesterov=nesterov,
        )

    @staticmethod
    def _make_scheduler(
        optimizer: torch.optim.Optimizer, schedule: str, total_steps: int
    ) -> torch.optim.lr_scheduler.LRScheduler:
        if schedule == "onecycle":
            max_lr = optimizer.param_groups[0]["lr"]
            return torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=max_lr, total_steps=total_steps, pct_start=0.25
            )
        milestones = sorted({max(1, round(total_steps * f)) for f in (0.5, 0.75)})
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)

    def _make_memory(self) -> MemoryWrapper:

        c = self.config
        return MemoryWrapper(
            self.model,
            num_samples=len(self.splits.train),
            sample_shape=self.splits.sample_shape,
            beta_prime=c.beta_prime,
            depth=c.depth,
            weighting=c.weighting,
            mode=c.memory_mode,
            dtype=_torch_dtype(c.memory_dtype),
            device=c.memory_device,
            eps=c.eps,
            bn_mode=c.bn_mode,
        )

    def _loader(self, epoch: int) -> DataLoader:
        # One generator per (seed, epoch): the order is reproducible and independent of the attacks.
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        n = len(self.splits.train)
        return DataLoader(
            self.splits.train,
            batch_size=self.config.batch_size,
            shuffle=True,
            generator=generator,
            # A final batch of one cannot go through train-mode BatchNorm.
            drop_last=n % self.config.batch_size == 1,
        )

    def test_loader(self, batch_size: int = 512) -> DataLoader:
        """A loader over the test set, in order."""
        return DataLoader(self.splits.test, batch_size=batch_size, shuffle=False)

    def _objective_kwargs(self) -> dict[str, Any]:
        c = self.config
        kwargs: dict[str, Any] = {
            "eps": c.eps,
            "step_size": c.resolved_step_size,
            "steps": c.resolved_steps,
        }
        beta = c.resolved_beta
        if c.method in ("trades", "mart", "squeeze"):
            kwargs["beta"] = beta
        elif c.method == "hat":
            kwargs.update(beta=beta, helper=self.helper, h=c.hat_h, gamma=c.hat_gamma)
        elif c.method == "single_step":
            kwargs["reg_weight"] = beta
        return kwargs

    # -- training -----------------------------------------------------------------------------

    def train_helper(self, *, wrap: Callable[[Iterable], Iterable] | None = None) -> None:
        """Train HAT's helper with plain cross-entropy for ``helper_epochs``, then freeze it.

        Does nothing for other methods or when the helper is already trained.
        """
        if self.helper is None or self.helper_trained:
            return
        helper = self.helper
        optimizer = self._make_optimizer(helper, nesterov=False)
        epochs = self.config.helper_epochs
        scheduler = self._make_scheduler(
            optimizer, "piecewise", max(1, epochs * self.steps_per_epoch)
        )
        helper.train()
        for epoch in range(epochs):
            # Negative epoch numbers keep the helper's data order apart from the main run's.
            batches: Iterable = self._loader(-1 - epoch)
            for x, y, _ in wrap(batches) if wrap else batches:
                x, y = x.to(self.device), y.to(self.device)
                loss = F.cross_entropy(helper(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
        self._freeze_helper()
        self.helper_trained = True

    def _freeze_helper(self) -> None:
        assert self.helper is not None
        self.helper.eval()
        for p in self.helper.parameters():
            p.requires_grad_(False)

    def train_epoch(self, *, wrap: Callable[[Iterable], Iterable] | None = None) -> EpochStats:
        """Run one epoch of adversarial training (plus the memory term when enabled).

        Raises:
            FloatingPointError: If the loss becomes non-finite (lower ``lr`` or ``eps``).
        """
        if self.helper is not None and not self.helper_trained:
            self.train_helper(wrap=wrap)
        objective = _objective(self.config.method)
        kwargs = self._objective_kwargs()
        model, memory = self.model, self.memory
        model.train()
        start = time.perf_counter()
        loss_sum = term_sum = 0.0
        correct = seen = 0
        batches: Iterable = self._loader(self.epoch)
        for x, y, idx in wrap(batches) if wrap else batches:
            x, y = x.to(self.device), y.to(self.device)
            out = objective(model, x, y, **kwargs)
            loss = out.loss
            if memory is not None:
                term = memory(idx, x, out.adv, out.logits, y)
                total = loss + term
                term_sum += float(term.detach()) * len(y)
            else:
                total = loss
            if not torch.isfinite(total.detach()):
                raise FloatingPointError(
                    f"non-finite loss {float(total)} in epoch {self.epoch + 1}; "
                    f"lower the learning rate (now {self.config.lr}) or eps"
                )
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            self.optimizer.step()
            self.scheduler.step()
            loss_sum += float(loss.detach()) * len(y)
            correct += int((out.logits.detach().argmax(dim=1) == y).sum())
            seen += len(y)
        self.epoch += 1
        stats = EpochStats(
            epoch=self.epoch,
            loss=loss_sum / max(seen, 1),
            memory_term=term_sum / max(seen, 1),
            train_clean_accuracy=correct / max(seen, 1),
            test_clean_accuracy=clean_accuracy(model, self.test_loader(), device=self.device),
            lr=float(self.optimizer.param_groups[0]["lr"]),
            seconds=time.perf_counter() - start,
        )
        self.history.append(dataclasses.asdict(stats))
        logger.info("epoch %d: %s", self.epoch, stats)
        return stats

    def fit(
        self,
        *,
        checkpoint_path: str | Path | None = None,
        until_epoch: int | None = None,
        wrap: Callable[[Iterable], Iterable] | None = None,
        on_epoch_end: Callable[[EpochStats], None] | None = None,
    ) -> list[EpochStats]:
        """Train from the current epoch up to ``until_epoch`` (default: ``config.epochs``).

        Args:
            checkpoint_path: Where to save a checkpoint after every epoch (default: no saving).
            until_epoch: Stop after this many completed epochs (default: ``config.epochs``).
            wrap: Wraps each epoch's batch iterable, e.g. in a progress bar.
            on_epoch_end: Called with each epoch's statistics.

        Returns:
            The statistics of the epochs run now.
        """
        last = self.config.epochs if until_epoch is None else until_epoch
        if not 0 <= last <= self.config.epochs:
            raise ValueError(f"until_epoch must be in [0, {self.config.epochs}], got {last!r}")
        done: list[EpochStats] = []
        while self.epoch < last:
            stats = self.train_epoch(wrap=wrap)
            done.append(stats)
            if checkpoint_path is not None:
                self.save(checkpoint_path)
            if on_epoch_end is not None:
                on_epoch_end(stats)
        return done

    # -- checkpointing ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run, as tensors and primitives only."""
        rng: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "dataset": {
                "name": self.splits.name,
                "num_classes": self.splits.num_classes,
                "sample_shape": list(self.splits.sample_shape),
                "num_train": len(self.splits.train),
                "synthetic": self.splits.synthetic,
                "split_seed": self.splits.split_seed,
                "augment": self.splits.augment,
            },
            "model_name": self.model_name,
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "memory": None if self.memory is None else self.memory.state_dict(),
            "helper": None if self.helper is None else self.helper.state_dict(),
            "helper_trained": self.helper_trained,
            "rng": rng,
            "history": list(self.history),
            "torch_version": str(torch.__version__),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the configs must match.

        Raises:
            ValueError: If the checkpoint was written for another config or dataset.
        """
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not a training checkpoint: format {state.get('format')!r}")
        if state["config"] != self.config.to_dict():
            raise ValueError("checkpoint config differs from this run's config")
        if state["dataset"]["name"] != self.splits.name or state["dataset"]["num_train"] != len(
            self.splits.train
        ):
            raise ValueError(
                f"checkpoint was written for dataset {state['dataset']['name']!r} with "
                f"{state['dataset']['num_train']} training samples, not {self.splits.name!r} "
                f"with {len(self.splits.train)}"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.memory is not None:
            self.memory.load_state_dict(state["memory"])
        if self.helper is not None:
            self.helper.load_state_dict(state["helper"])
            self.helper_trained = bool(state["helper_trained"])
            if self.helper_trained:
                self._freeze_helper()
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(_as_python_rng_state(state["rng"]["python"]))
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def save(self, path: str | Path) -> None:
        """Save :meth:`state_dict` atomically to ``path``."""
        save_checkpoint(self.state_dict(), path)

    @classmethod
    def resume(cls, path: str | Path, splits: DatasetSplits, **overrides: Any) -> TrainingRun:
        """Rebuild a run from a checkpoint written by :meth:`save`.

        Args:
            path: The checkpoint.
            splits: The dataset it was trained on.
            **overrides: Config fields to change on the way, e.g. ``device``; the run's
                definition (method, epochs, seed, ...) must not change.
        """
        state = load_checkpoint(path)
        values = dict(state["config"], **overrides)
        run = cls(TrainConfig.from_dict(values), splits)
        state = dict(state, config=run.config.to_dict())
        run.load_state_dict(state)
        return run


def _as_python_rng_state(state: Any) -> tuple:
    # random.setstate needs tuples; a checkpoint may hand back lists.
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
