"""Training with any reference objective, with or without MemLoss: building a run and its epochs.

A :class:`TrainingRun` owns the model, the SGD optimizer and its per-batch learning-rate schedule,
the optional :class:`~memloss_addon.MemoryWrapper`, the frozen helper model HAT needs, the
held-out split, the best weights so far and the epoch counter. :meth:`TrainingRun.fit` can save a
checkpoint after every epoch and :meth:`TrainingRun.resume` continues from one (see
:mod:`memloss_addon.experiments.checkpoints`).

The settings come from a :class:`~memloss_addon.experiments.train_config.TrainConfig`; the parts
are built by :mod:`memloss_addon.experiments.training_setup`. The attacks' random starts draw from
the global torch RNG, which building a run seeds and checkpoints save. The evaluations after each
epoch (test accuracy, the robust-overfitting curve, the held-out PGD-20) leave every random
stream, module flag and BatchNorm statistic as they found them, so they never change training.

Each epoch's figures are an :class:`~memloss_addon.experiments.epoch_records.EpochStats`.

The fast path (:class:`~memloss_addon.experiments.train_config.TrainConfig` fields ``amp``,
``channels_last``, ``compile``, ``device_data``): the training forward passes may run under bf16
autocast, on a ``torch.compile``-d model, in channels-last format, on batches cut on the device
from a :class:`~memloss_addon.experiments.gpu_data.DeviceDataset`. The epoch's sums (loss, term,
correct predictions, a non-finite flag) stay on the device and are read every
:data:`SYNC_EVERY` steps and at the end of the epoch, so a step asks the host for nothing (on
the CPU, where asking costs nothing, they are read after every step, so a non-finite loss stops
the run before its optimiser step).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from memloss_addon.checks import check_choice
from memloss_addon.experiments.attacks import preserve_rng_state
from memloss_addon.experiments.checkpoints import (
    load_checkpoint,
    restore_training_state,
    save_checkpoint,
    training_state,
)
from memloss_addon.experiments.datasets import DatasetSplits
from memloss_addon.experiments.epoch_records import EpochStats
from memloss_addon.experiments.evaluate import evaluate
from memloss_addon.experiments.evaluation_data import evaluation_loader
from memloss_addon.experiments.gpu_data import DeviceDataset, augment_batch, dataset_tensors
from memloss_addon.experiments.models import ModelName, build_model, default_model
from memloss_addon.experiments.names import MODEL_STATES, ModelState
from memloss_addon.experiments.train_config import (
    AUGMENT_PADDING,
    EXECUTION_FIELDS,
    TrainConfig,
    describe_lr_schedule,
)
from memloss_addon.experiments.training_setup import (
    augmentation_generator,
    augments_flips,
    base_objective,
    build_lr_scheduler,
    build_memory,
    build_optimizer,
    epoch_loader,
    epoch_order,
    freeze,
    memory_attack_start,
    objective_kwargs,
    split_holdout,
)

__all__ = [
    "CURVE_PGD_STEPS",
    "SYNC_EVERY",
    "BatchWrapper",
    "EpochBatches",
    "EpochStats",
    "TrainingRun",
    "clean_accuracy",
]

logger = logging.getLogger(__name__)

BatchWrapper = Callable[[Iterable[Any]], Iterable[Any]]
"""Wraps an epoch's iterable of batches, e.g. in a progress bar."""

CURVE_PGD_STEPS = 20
"""Steps of the PGD of the per-epoch curve and of the held-out selection (step 2.5 eps / 20)."""

SYNC_EVERY = 50
"""Steps between reads of the epoch's sums on an accelerator (the non-finite check included)."""


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


class _EpochTotals:
    """Sums over an epoch's batches, weighted by batch size, kept on the device.

    Float64 sums of the float32 values times the batch size, in batch order: the same numbers
    the host computed before it kept them on the device.
    """

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.memory_term = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.finite = torch.ones((), dtype=torch.bool, device=device)
        self.seen = 0

    def read(self) -> dict[str, float]:
        """The means (one host synchronisation)."""
        loss, term, correct, finite = torch.stack(
            [self.loss, self.memory_term, self.correct.double(), self.finite.double()]
        ).tolist()
        seen = max(self.seen, 1)
        return {
            "loss": loss / seen,
            "memory_term": term / seen,
            "correct": correct / seen,
            "finite": finite,
        }


_View = tuple[torch.Tensor, torch.Tensor]
_Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, _View | None]


class EpochBatches:
    """One epoch's training batches ``(x, y, idx, view)``, ``x`` and ``y`` on the run's device,
    augmented and in the run's memory format; ``view`` is ``(offsets, flips)`` of the crop and
    flip that made ``x`` from the padded images, or ``None`` without augmentation.

    Sized (``len`` is the number of batches); :attr:`samples` is the number of images, for
    progress bars that count images per second.
    """

    def __init__(self, run: TrainingRun, epoch: int) -> None:
        self.run, self.epoch = run, epoch
        self.samples = len(run.train_splits.train)
        self._loader = epoch_loader(run.train_splits, run.config, epoch)

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self) -> Iterator[_Batch]:
        run, config = self.run, self.run.config
        device_data = run.device_data
        generator = (
            augmentation_generator(config, self.epoch, run.device)
            if config.augment or device_data is not None
            else None
        )
        if device_data is not None:
            order = epoch_order(run.train_splits, config, self.epoch)
            for batch in device_data.batches(config.batch_size, order=order, generator=generator):
                crop = (batch.offsets, batch.flips) if config.augment else None
                yield batch.x, batch.y, batch.idx, crop
            return
        memory_format = torch.channels_last if config.channels_last else None
        for x, y, idx in self._loader:
            x, y = x.to(run.device), y.to(run.device)
            view: _View | None = None
            if config.augment:
                x, offsets, flips = augment_batch(
                    x,
                    padding=AUGMENT_PADDING,
                    pad_mode=config.pad_mode,
                    flip=augments_flips(run.splits),
                    generator=generator,
                )
                view = (offsets, flips)
            if memory_format is not None and x.dim() == 4:
                x = x.contiguous(memory_format=memory_format)
            yield x, y, idx, view


class TrainingRun:
    """One training run: model, optimiser, schedule, memory, helper and epoch counter.

    Building a run seeds the global torch and Python generators with ``config.seed`` (the model's
    initialisation and the attacks' random starts draw from them), which is what makes a run
    reproducible from its config alone. With ``config.holdout`` the run trains on the training
    set less the held-out samples (:func:`~.training_setup.split_holdout`) and keeps, in
    :attr:`best`, the weights of the epoch with the highest held-out PGD-20 accuracy (the earliest
    of equals).

    Args:
        config: The run's settings.
        splits: The dataset (its training set yields ``(x, y, idx)``).

    Raises:
        ValueError: ``config.augment`` with a dataset that augments already or images under 16
            pixels a side, or a bad setting.

    Attributes:
        model: The model (uncompiled: what checkpoints save and evaluations run).
        train_model: What the training steps and the memory call: ``model``, or its
            ``torch.compile`` with ``config.compile``.
        device_data: The training set on the device (:class:`~.gpu_data.DeviceDataset`) when
            ``config.resolved_device_data``, else ``None`` (a DataLoader feeds the steps).
        sync_every: Steps between reads of the epoch's sums on the host (the non-finite check
            included): 1 on the CPU, where a read costs nothing and a non-finite loss then stops
            the run before its optimiser step; :data:`SYNC_EVERY` on an accelerator.
        train_splits: The splits the run trains on (``splits`` less the held-out samples).
        holdout_set: The held-out samples (items ``(x, y)``), or ``None``.
        best: ``{"epoch", "holdout_pgd_accuracy", "model"}`` of the best epoch so far, or
            ``None`` (no held-out split, or no epoch yet).

    Example:
        >>> from memloss_addon.experiments.datasets import load_digits
        >>> splits = load_digits()
        >>> config = TrainConfig(method="pgd_at", epochs=1, steps=1, memory=True, holdout=100)
        >>> run = TrainingRun(config, splits)
        >>> run.epoch, run.memory is not None, run.memory.num_samples, len(run.holdout_set)
        (0, True, 1337, 100)
    """

    def __init__(self, config: TrainConfig, splits: DatasetSplits) -> None:
        self.config = config
        self.splits = splits
        self.device = torch.device(config.device)
        self.model_name: ModelName = config.model or default_model(splits.sample_shape)
        if config.augment and splits.augment:
            raise ValueError(
                "augment crops and flips the batches, and this dataset augments its items "
                "already: load it with augment=False"
            )
        if config.augment and min(splits.sample_shape[1:]) < 4 * AUGMENT_PADDING:
            raise ValueError(
                f"augment pads by {AUGMENT_PADDING} and crops: for images of at least "
                f"{4 * AUGMENT_PADDING} pixels a side (CIFAR, SVHN), not {splits.name}'s "
                f"{splits.sample_shape[1:]}"
            )
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        self.train_splits, self.holdout_set = split_holdout(splits, config.holdout)
        self.model = self._build_model()
        self.helper: nn.Module | None = self._build_model() if config.method == "hat" else None
        self.helper_trained = False
        self.train_model: nn.Module = self.model
        if config.compile is not None:
            compiled = torch.compile(self.model, backend=config.compile)
            self.train_model = cast(nn.Module, compiled)  # an OptimizedModule
        self.device_data = self._device_data() if config.resolved_device_data else None
        self.sync_every = 1 if self.device.type == "cpu" else SYNC_EVERY
        self.steps_per_epoch = len(epoch_loader(self.train_splits, config, 0))
        self.optimizer = build_optimizer(self.model, config, nesterov=config.recipe.nesterov)
        self.scheduler = build_lr_scheduler(
            self.optimizer,
            config.resolved_schedule,
            config.epochs * self.steps_per_epoch,
            milestones=config.resolved_milestones,
        )
        self.memory = (
            build_memory(self.train_model, config, self.train_splits)
            if config.needs_memory
            else None
        )
        if self.memory is not None:
            self._check_model()
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None

    def _build_model(self) -> nn.Module:
        splits = self.splits
        model = build_model(
            self.model_name,
            sample_shape=splits.sample_shape,
            num_classes=splits.num_classes,
            **self.config.model_options(),
        )
        if self.config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model.to(self.device)

    def _device_data(self) -> DeviceDataset:
        images, labels = dataset_tensors(self.train_splits.train)
        config = self.config
        return DeviceDataset(
            images,
            labels,
            device=self.device,
            padding=AUGMENT_PADDING if config.augment else 0,
            pad_mode=config.pad_mode,
            augment=config.augment,
            flip=augments_flips(self.splits),
            channels_last=config.channels_last,
        )

    def epoch_batches(self, epoch: int) -> EpochBatches:
        """The training batches of ``epoch`` (0-based; negative for HAT's helper)."""
        return EpochBatches(self, epoch)

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.config.amp == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _check_model(self) -> None:
        """Fail now, not an epoch in, when the model's output is not logits the memory can use."""
        assert self.memory is not None
        with preserve_rng_state():  # reading a sample may draw random numbers; training must not
            x = self.splits.test[0][0]
        self.memory.check_model(x.unsqueeze(0).to(self.device), num_classes=self.splits.num_classes)

    def test_loader(self, batch_size: int = 512) -> DataLoader:
        """A loader over the test set, in order."""
        return DataLoader(self.splits.test, batch_size=batch_size, shuffle=False)

    def schedule_description(self) -> str:
        """The learning-rate schedule in words (:func:`~.train_config.describe_lr_schedule`)."""
        return describe_lr_schedule(self.config, steps_per_epoch=self.steps_per_epoch)

    # -- training -----------------------------------------------------------------------------

    def train_helper(self, *, wrap: BatchWrapper | None = None) -> None:
        """Train HAT's helper with plain cross-entropy for ``helper_epochs``, then freeze it.

        Does nothing for other methods or when the helper is already trained. The helper never
        sees the held-out samples.
        """
        if self.helper is None or self.helper_trained:
            return
        helper, epochs = self.helper, self.config.helper_epochs
        optimizer = build_optimizer(helper, self.config, nesterov=False)
        scheduler = build_lr_scheduler(
            optimizer, "piecewise", max(1, epochs * self.steps_per_epoch)
        )
        helper.train()
        for epoch in range(epochs):
            # Negative epoch numbers keep the helper's data order apart from the main run's.
            batches: Iterable = self.epoch_batches(-1 - epoch)
            for x, y, *_ in wrap(batches) if wrap else batches:
                with self._autocast():
                    logits = helper(x)
                loss = F.cross_entropy(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
        freeze(helper)
        self.helper_trained = True

    def train_epoch(self, *, wrap: BatchWrapper | None = None) -> EpochStats:
        """Run one epoch of adversarial training (plus the memory term when enabled), then the
        evaluations the config asks for.

        Raises:
            FloatingPointError: If the loss becomes non-finite (lower ``lr`` or ``eps``).
        """
        if self.helper is not None and not self.helper_trained:
            self.train_helper(wrap=wrap)
        objective = base_objective(self.config.method)
        kwargs = objective_kwargs(self.config, helper=self.helper)
        from_memory = not self.config.resets_attack(self.epoch + 1)
        self.model.train()
        start, cpu_start = time.perf_counter(), time.process_time()
        totals = _EpochTotals(self.device)
        sync_every = self.sync_every
        batches: Iterable = self.epoch_batches(self.epoch)
        for step, (x, y, idx, view) in enumerate(wrap(batches) if wrap else batches, start=1):
            view = view if self.config.memory_aligned else None
            init = self._attack_init(idx, x, view) if from_memory else None
            self._train_batch(
                x, y, idx, objective, kwargs, totals, init=init, check=sync_every == 1, view=view
            )
            if step % sync_every == 0:
                self._check_finite(totals)
        means = totals.read()  # waits for the epoch's last step: the time below includes it
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        self._check_finite(totals, means["finite"])
        self.epoch += 1
        memory = self.memory.epoch_stats() if self.memory is not None else {}
        evaluated = time.perf_counter()
        test_clean = clean_accuracy(self.model, self.test_loader(), device=self.device)
        curve = self._curve()
        holdout = self._holdout_pgd()
        best_so_far = None if self.best is None else self.best["holdout_pgd_accuracy"]
        if holdout is not None and (best_so_far is None or holdout > best_so_far):
            self.best = {
                "epoch": self.epoch,
                "holdout_pgd_accuracy": holdout,
                "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            }
        stats = EpochStats(
            epoch=self.epoch,
            loss=means["loss"],
            memory_term=means["memory_term"],
            memory_mean_term=memory.get("mean_term"),
            memory_mean_weight=memory.get("mean_weight"),
            memory_accuracy=memory.get("memory_accuracy"),
            rows_classified=memory.get("rows_classified"),
            rows_forgotten=memory.get("rows_forgotten"),
            rows_recovered=memory.get("rows_recovered"),
            rows_skipped=memory.get("rows_skipped"),
            train_clean_accuracy=means["correct"],
            test_clean_accuracy=test_clean,
            curve_clean_accuracy=curve.get("clean"),
            curve_pgd_accuracy=curve.get("pgd"),
            holdout_pgd_accuracy=holdout,
            attack_from_memory=from_memory,
            lr=float(self.optimizer.param_groups[0]["lr"]),
            seconds=seconds,
            cpu_seconds=cpu_seconds,
            eval_seconds=time.perf_counter() - evaluated,
        )
        self.history.append(dataclasses.asdict(stats))
        logger.info("epoch %d: %s", self.epoch, stats)
        return stats

    def _check_finite(self, totals: _EpochTotals, finite: float | None = None) -> None:
        if finite is None:
            finite = float(totals.finite)
        if not finite:
            raise FloatingPointError(
                f"non-finite loss in epoch {self.epoch + 1}; lower the learning rate (now "
                f"{self.config.lr}) or eps"
            )

    def _attack_init(
        self, idx: torch.Tensor, x: torch.Tensor, view: _View | None
    ) -> torch.Tensor | None:
        assert self.memory is not None  # attack_init="memory" always builds one
        return memory_attack_start(self.memory, idx, x, eps=self.config.eps, view=view)

    def _train_batch(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        idx: torch.Tensor,
        objective: Callable[..., Any],
        kwargs: dict[str, Any],
        totals: _EpochTotals,
        *,
        init: torch.Tensor | None,
        check: bool,
        view: _View | None = None,
    ) -> None:
        """One step; ``check``: ask the host whether the loss is finite before stepping;
        ``view``: the batch's crop and flip, for an aligned memory."""
        with self._autocast():
            out = objective(self.train_model, x, y, init=init, **kwargs)
            loss = total = out.loss
            term = None
            if self.memory is not None:
                term = self.memory(
                    idx, x, out.adv, out.logits, y, adv_logits=out.adv_logits, view=view
                )
                if self.config.memory:  # otherwise its weight is 0 and nothing is added
                    total = loss + term
                else:
                    term = None
        finite = torch.isfinite(total.detach())
        if check and not bool(finite):
            raise FloatingPointError(
                f"non-finite loss {float(total)} in epoch {self.epoch + 1}; "
                f"lower the learning rate (now {self.config.lr}) or eps"
            )
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        self.scheduler.step()
        count = len(y)
        if term is not None:
            totals.memory_term += term.detach().double() * count
        totals.loss += loss.detach().double() * count
        totals.correct += (out.logits.detach().argmax(dim=1) == y).sum()
        totals.finite &= finite
        totals.seen += count

    # -- evaluations after an epoch -----------------------------------------------------------

    def _curve(self) -> dict[str, float]:
        """Clean and PGD-20 accuracy on the first ``curve_samples`` test samples ({} if off)."""
        if self.config.curve_samples is None:
            return {}
        return self._pgd_accuracy(
            evaluation_loader(self.splits.test, self.config.curve_samples), ("clean", "pgd")
        )

    def _holdout_pgd(self) -> float | None:
        if self.holdout_set is None:
            return None
        return self._pgd_accuracy(evaluation_loader(self.holdout_set, None), ("pgd",))["pgd"]

    def _pgd_accuracy(self, loader: DataLoader, attacks: tuple[Any, ...]) -> dict[str, float]:
        return evaluate(
            self.model,
            loader,
            eps=self.config.eps,
            attacks=attacks,
            pgd_steps=CURVE_PGD_STEPS,
            seed=self.config.seed,
            progress=False,
        )

    def model_with(self, weights: ModelState = "last") -> nn.Module:
        """A copy of the model with the ``"last"`` or the ``"best"`` epoch's weights, in eval mode.

        Raises:
            ValueError: For ``"best"`` when the run has no held-out split or no epoch yet.
        """
        check_choice("weights", weights, MODEL_STATES)
        if weights == "last":
            state = self.model.state_dict()
        elif self.best is None:
            raise ValueError("the run has no best weights: train with holdout > 0")
        else:
            state = self.best["model"]
        model = self._build_model()
        model.load_state_dict(state)
        return model.eval()

    def fit(
        self,
        *,
        checkpoint_path: str | Path | None = None,
        until_epoch: int | None = None,
        wrap: BatchWrapper | None = None,
        on_epoch_end: Callable[[EpochStats], None] | None = None,
    ) -> list[EpochStats]:
        """Train from the current epoch up to ``until_epoch`` (default: ``config.epochs``).

        Args:
            checkpoint_path: Where to save a checkpoint after every epoch (default: no saving).
            until_epoch: Stop after this many completed epochs (default: ``config.epochs``).
            wrap: Wraps each epoch's batch iterable, e.g. in a progress bar.
            on_epoch_end: Called with each epoch's statistics (after the checkpoint is saved).

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
        """Everything needed to continue the run (:func:`~.checkpoints.training_state`)."""
        return training_state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, the global RNG states included; the configs must match.

        Raises:
            ValueError: If the checkpoint was written for another config or dataset.
        """
        restore_training_state(self, state)

    def save(self, path: str | Path) -> None:
        """Save :meth:`state_dict` atomically to ``path``."""
        save_checkpoint(self.state_dict(), path)

    @classmethod
    def resume(cls, path: str | Path, splits: DatasetSplits, **overrides: Any) -> TrainingRun:
        """Rebuild a run from a checkpoint written by :meth:`save`.

        Args:
            path: The checkpoint.
            splits: The dataset it was trained on.
            **overrides: Fields of :data:`~.train_config.EXECUTION_FIELDS` to change on the way,
                e.g. ``device``; the run's definition (method, epochs, seed, ...) does not change.

        Raises:
            ValueError: An override outside those fields, or a checkpoint of another run.
        """
        unknown = sorted(set(overrides) - set(EXECUTION_FIELDS))
        if unknown:
            raise ValueError(
                f"a resumed run keeps its definition; only {', '.join(EXECUTION_FIELDS)} may "
                f"change, not {', '.join(unknown)}"
            )
        state = load_checkpoint(path)
        values = dict(state["config"], **overrides)
        run = cls(TrainConfig.from_dict(values), splits)
        state = dict(state, config=run.config.to_dict())
        run.load_state_dict(state)
        return run
