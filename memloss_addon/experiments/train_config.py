"""What defines a training run: the base methods, their reference recipes and :class:`TrainConfig`.

Settings per method (:data:`METHOD_RECIPES`) follow each method's reference recipe: momentum 0.9;
weight decay 5e-4 (PGD-AT, HAT, ST, single-step), 2e-4 (TRADES), 3.5e-3 (MART, its ResNet-18
value); Nesterov and a one-cycle schedule for HAT; otherwise the learning rate drops tenfold at 50%
and again at 75% of the steps (PGD-AT's milestones, scaled to the run's length; ``milestones``
chooses others). One base learning rate serves all methods, so that a short run on small data is
comparable across them.

The module imports no torch (the argument checks import it when a config is made), so the
``memloss`` command's parser can read the recipes for its ``--help``.

Example:
    >>> config = TrainConfig(method="trades", eps=0.2)
    >>> config.resolved_beta, config.resolved_step_size, config.resolved_schedule
    (6.0, 0.05, 'piecewise')
    >>> describe_lr_schedule(TrainConfig(method="trades", epochs=15), steps_per_epoch=12)
    'lr 0.05, x0.1 in epochs 8 and 12 (after steps 90 and 135 of 180)'
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from numbers import Real
from typing import Any

from memloss_addon.experiments.names import (
    AMP_MODES,
    ATTACK_INITS,
    LR_SCHEDULES,
    METHOD_NAMES,
    MODEL_NAMES,
    NORMALIZATION_NAMES,
    PAD_MODES,
    AmpMode,
    AttackInit,
    LRSchedule,
    MethodName,
    ModelName,
    NormalizationName,
    PadMode,
)
from memloss_addon.options import (
    BN_MODES,
    MODES,
    STORAGE_DTYPE_NAMES,
    WEIGHTINGS,
    BNMode,
    Mode,
    StorageDtypeName,
    Weighting,
)

__all__ = [
    "ATTACK_INITS",
    "AUGMENT_PADDING",
    "DEFAULT_MILESTONES",
    "EXECUTION_FIELDS",
    "LR_SCHEDULES",
    "METHOD_NAMES",
    "METHOD_RECIPES",
    "ONECYCLE_WARMUP",
    "LRSchedule",
    "MethodName",
    "MethodRecipe",
    "TrainConfig",
    "describe_lr_schedule",
    "lr_schedule_help",
    "milestone_steps",
]

DEFAULT_MILESTONES: tuple[float, ...] = (0.5, 0.75)
"""Fractions of the steps after which the piecewise schedule multiplies the rate by 0.1."""

ONECYCLE_WARMUP = 0.25
"""Fraction of the steps over which the one-cycle schedule rises to its peak."""

AUGMENT_PADDING = 4
"""Pixels of padding per side of the random-crop augmentation (``RandomCrop(32, padding=4)``)."""

EXECUTION_FIELDS: tuple[str, ...] = (
    "device",
    "memory_device",
    "device_data",
    "amp",
    "channels_last",
    "compile",
)
"""Fields that say where and how fast a run executes rather than what it trains: a resumed run
may change them (:meth:`TrainingRun.resume <memloss_addon.experiments.training.TrainingRun.resume>`
takes them as overrides). ``amp`` changes the arithmetic, so a run resumed with another one
continues, but not bit for bit as it would have."""

_RESNETS = ("resnet18", "preact-resnet18")
_WIDE_RESNETS = ("wrn-34-10", "wrn-28-10")


@dataclass(frozen=True)
class MethodRecipe:
    """A method's usual optimiser settings and loss weight.

    Attributes:
        weight_decay: SGD weight decay.
        nesterov: Whether SGD uses Nesterov momentum.
        schedule: The learning-rate schedule, one of :data:`LR_SCHEDULES`.
        beta: The method's regularizer weight (TRADES/MART/HAT/ST beta, single-step lambda);
            ``None`` for PGD-AT, which has none.
    """

    weight_decay: float
    nesterov: bool
    schedule: LRSchedule
    beta: float | None


METHOD_RECIPES: dict[MethodName, MethodRecipe] = {
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
        attack_init: Where each training attack starts (one of :data:`ATTACK_INITS`):
            ``"random"``, the method's usual start; ``"memory"``, the sample's newest memory
            example (:meth:`memloss_addon.MemoryWrapper.recall`), so that a few steps per epoch
            accumulate across epochs as in ATTA (Zheng et al., CVPR 2020). Samples without one
            start as usual (see :func:`~.training_setup.memory_attack_start`).
        attack_reset_every: With ``attack_init="memory"``: the attacks of epochs 1, 1 + E,
            1 + 2E, ... start as usual instead (ATTA resets every 10 epochs). ``None``: only
            epoch 1, where the memory is empty.
        replay_fraction: Fraction of a batch's filled memory rows the term replays (the hardest
            by last known weight); 1.0 replays all.
        diagnostics: Classify every memory row read with the current model (eval mode, no
            gradient) and report forgetting per epoch; costs one extra forward pass of the rows.
        milestones: Fractions of the steps, increasing, in (0, 1), after which the learning rate
            drops x0.1. Given, the schedule is piecewise for every method (HAT's one-cycle
            included); ``None``: the recipe's schedule, piecewise at :data:`DEFAULT_MILESTONES`.
        holdout: Training samples held out (stratified by class, always the same ones for a
            dataset) to pick the best epoch by PGD-20 accuracy; never trained on. 0: none.
        curve_samples: After every epoch, measure clean and PGD-20 accuracy on the first this many
            test samples (the robust-overfitting curve); ``None``: no curve.
        normalization: Input normalization inside a paper-scale architecture (one of
            :data:`~.names.NORMALIZATION_NAMES`; ``None``: the architecture's default,
            ``"cifar10"``). Only for those models.
        base_width: First-stage width of ``resnet18`` and ``preact-resnet18`` (``None``: 64, the
            reference's); only for them (tests and timing use tiny widths).
        widen_factor: Width factor of ``wrn-34-10`` and ``wrn-28-10`` (``None``: 10); only for
            them.
        augment: Random crop (padding :data:`AUGMENT_PADDING`) and horizontal flip of every
            training batch, done by the run on the batch's device (no flip on SVHN, whose
            digits a mirror changes). The dataset itself must not augment.
        pad_mode: How the crop pads: ``"zeros"`` (torchvision's ``RandomCrop``) or
            ``"reflect"`` (robust_overfitting).
        amp: ``"bf16"`` runs the training forward passes (attack, objective, memory) under
            ``torch.autocast`` to bfloat16; the memory computes its term in float32 whatever the
            autocast. ``"off"`` (default): float32 throughout. Evaluations run in float32.
        channels_last: Keep the model's weights and the training batches in
            ``torch.channels_last`` memory format (faster convolutions on recent GPUs).
        compile: ``torch.compile`` the model for training with this backend (``"inductor"``,
            PyTorch's default; ``"eager"`` only traces, for tests); ``None``: no compilation.
            Evaluations and checkpoints use the uncompiled module (same weights).
        memory_aligned: Keep the memory aligned with the augmentation (ATTA's frame): it stores
            each perturbation in the padded frame through the inverse of the batch's crop and
            flip and replays it on the same image pixels under the next epoch's view
            (``MemoryWrapper(view_padding=...)``). Needs ``augment`` and
            ``memory_mode="perturbation"``.
        device_data: Hold the training set on ``device`` as one tensor (uint8 for image
            datasets that store bytes, as CIFAR and SVHN do) and cut, crop and flip batches there
            (:class:`~.gpu_data.DeviceDataset`): no DataLoader, no host copies per step.
            ``None`` (default): on when ``device`` is a CUDA device. On the CPU it gives the
            same batches as the DataLoader path, bit for bit.

    The memory exists when ``memory``, ``attack_init == "memory"`` or ``diagnostics``; without
    ``memory`` its weight is 0, so the term is never computed and training with
    ``attack_init="random"`` equals the base method bit for bit.

    Raises:
        TypeError: If a field has the wrong type (e.g. a float number of epochs).
        ValueError: If a field's value is out of range or not one of its choices.
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
    weighting: Weighting = "difficulty"
    memory_dtype: StorageDtypeName = "float32"
    memory_mode: Mode = "example"
    bn_mode: BNMode = "train"
    memory_device: str = "cpu"
    device: str = "cpu"
    seed: int = 0
    model: ModelName | None = None
    attack_init: AttackInit = "random"
    attack_reset_every: int | None = None
    replay_fraction: float = 1.0
    diagnostics: bool = False
    milestones: tuple[float, ...] | None = None
    holdout: int = 0
    curve_samples: int | None = None
    normalization: NormalizationName | None = None
    base_width: int | None = None
    widen_factor: int | None = None
    augment: bool = False
    pad_mode: PadMode = "zeros"
    amp: AmpMode = "off"
    channels_last: bool = False
    compile: str | None = None
    device_data: bool | None = None
    memory_aligned: bool = False

    def __post_init__(self) -> None:
        # Imported here: the checks import torch, and the command's --help reads this module.
        from memloss_addon.checks import check_choice, finite_number, positive_int

        check_choice("method", self.method, METHOD_NAMES)
        for name in ("epochs", "batch_size", "steps", "depth"):
            positive_int(name, getattr(self, name))
        positive_int("helper_epochs", self.helper_epochs, minimum=0)
        finite_number("eps", self.eps, positive=True)
        finite_number("lr", self.lr, positive=True)
        check_choice("weighting", self.weighting, WEIGHTINGS)
        check_choice("memory_dtype", self.memory_dtype, STORAGE_DTYPE_NAMES)
        check_choice("memory_mode", self.memory_mode, MODES)
        check_choice("bn_mode", self.bn_mode, BN_MODES)
        if self.model is not None:
            check_choice("model", self.model, MODEL_NAMES)
        check_choice("attack_init", self.attack_init, ATTACK_INITS)
        if self.attack_reset_every is not None:
            positive_int("attack_reset_every", self.attack_reset_every)
            if self.attack_init != "memory":
                raise ValueError(
                    "attack_reset_every restarts memory-started attacks: it needs "
                    f"attack_init='memory', got attack_init={self.attack_init!r}"
                )
        fraction = finite_number("replay_fraction", self.replay_fraction, positive=True)
        if fraction > 1:
            raise ValueError(f"replay_fraction must lie in (0, 1], got {self.replay_fraction!r}")
        for name in ("memory", "diagnostics"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.milestones is not None:
            object.__setattr__(self, "milestones", _check_milestones(self.milestones))
        positive_int("holdout", self.holdout, minimum=0)
        if self.curve_samples is not None:
            positive_int("curve_samples", self.curve_samples)
        self._check_architecture_options()
        for name in ("augment", "channels_last", "memory_aligned"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.device_data is not None and not isinstance(self.device_data, bool):
            raise TypeError(f"device_data must be a bool or None, got {self.device_data!r}")
        check_choice("pad_mode", self.pad_mode, PAD_MODES)
        check_choice("amp", self.amp, AMP_MODES)
        if self.compile is not None and (not isinstance(self.compile, str) or not self.compile):
            raise TypeError(f"compile must be a backend name or None, got {self.compile!r}")
        if self.memory_aligned and (not self.augment or self.memory_mode != "perturbation"):
            raise ValueError(
                "memory_aligned replays perturbations under each epoch's crop and flip: it needs "
                f"augment=True and memory_mode='perturbation', got augment={self.augment!r}, "
                f"memory_mode={self.memory_mode!r}"
            )

    def _check_architecture_options(self) -> None:
        from memloss_addon.checks import check_choice, positive_int

        model = self.model
        if self.normalization is not None:
            check_choice("normalization", self.normalization, NORMALIZATION_NAMES)
            if model not in _RESNETS + _WIDE_RESNETS:
                raise ValueError(
                    "normalization applies to the paper-scale architectures "
                    f"({', '.join(_RESNETS + _WIDE_RESNETS)}), not to model={model!r}"
                )
        for name, models in (("base_width", _RESNETS), ("widen_factor", _WIDE_RESNETS)):
            value = getattr(self, name)
            if value is None:
                continue
            positive_int(name, value)
            if model not in models:
                raise ValueError(f"{name} applies to {' and '.join(models)}, not to {model!r}")

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

    @property
    def resolved_schedule(self) -> LRSchedule:
        """The learning-rate schedule in use: piecewise whenever ``milestones`` is given."""
        return "piecewise" if self.milestones is not None else self.recipe.schedule

    @property
    def resolved_milestones(self) -> tuple[float, ...]:
        """The piecewise schedule's fractions in use (:data:`DEFAULT_MILESTONES` by default)."""
        return DEFAULT_MILESTONES if self.milestones is None else self.milestones

    @property
    def resolved_device_data(self) -> bool:
        """Whether the training set lives on the device: ``device_data``, or by default whether
        ``device`` is a CUDA device."""
        if self.device_data is not None:
            return self.device_data
        return str(self.device).split(":")[0] == "cuda"

    def model_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~.models.build_model` the config sets (width and
        normalization of the paper-scale architectures)."""
        options: dict[str, Any] = {}
        if self.normalization is not None:
            options["normalization"] = self.normalization
        for name in ("base_width", "widen_factor"):
            if getattr(self, name) is not None:
                options[name] = getattr(self, name)
        return options

    @property
    def needs_memory(self) -> bool:
        """Whether the run keeps a memory: for the term, memory-started attacks or diagnostics."""
        return self.memory or self.attack_init == "memory" or self.diagnostics

    @property
    def memory_beta_prime(self) -> float:
        """The memory's weight: ``beta_prime`` with MemLoss on, 0 without (no term computed)."""
        return self.beta_prime if self.memory else 0.0

    def resets_attack(self, epoch: int) -> bool:
        """Whether the attacks of 1-based ``epoch`` start as usual rather than from the memory.

        Example:
            >>> config = TrainConfig(method="pgd_at", attack_init="memory", attack_reset_every=10)
            >>> [e for e in range(1, 25) if config.resets_attack(e)]
            [1, 11, 21]
        """
        if self.attack_init != "memory" or epoch <= 1:
            return True
        every = self.attack_reset_every
        return every is not None and (epoch - 1) % every == 0

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict of primitives (what checkpoints and results.json store)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Rebuild from :meth:`to_dict`'s output; unknown keys raise ``ValueError``.

        Keys missing from an older dict take their defaults.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training config keys: {unknown}")
        return cls(**values)


def _check_milestones(values: object) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, (tuple, list)):
        raise TypeError(f"milestones must be a tuple of fractions, got {values!r}")
    fractions: list[float] = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"milestones must hold real numbers, got {value!r}")
        if not 0.0 < float(value) < 1.0:
            raise ValueError(f"milestones must lie in (0, 1), got {value!r}")
        if fractions and float(value) <= fractions[-1]:
            raise ValueError(f"milestones must increase, got {tuple(values)!r}")
        fractions.append(float(value))
    return tuple(fractions)


def milestone_steps(fractions: tuple[float, ...], total_steps: int) -> list[int]:
    """The optimiser steps after which the piecewise rate drops: ``round(f * total_steps)``,
    at least 1, without repeats.

    Example:
        >>> milestone_steps((0.5, 0.75), 12), milestone_steps((0.75, 0.9), 4)
        ([6, 9], [3, 4])
    """
    return sorted({max(1, round(total_steps * f)) for f in fractions})


def describe_lr_schedule(config: TrainConfig, *, steps_per_epoch: int) -> str:
    """The learning-rate schedule of a run in words, with the epochs where the rate changes.

    The schedule steps per batch, so a drop can fall inside an epoch: "in epoch 8" means the
    rate drops during epoch 8 (or at its start).

    Example:
        >>> describe_lr_schedule(TrainConfig(method="pgd_at", epochs=3), steps_per_epoch=12)
        'lr 0.05, x0.1 in epochs 2 and 3 (after steps 18 and 27 of 36)'
        >>> describe_lr_schedule(TrainConfig(method="pgd_at", epochs=2), steps_per_epoch=3)
        'lr 0.05, x0.1 twice in epoch 2 (after steps 3 and 4 of 6)'
        >>> describe_lr_schedule(TrainConfig(method="hat", epochs=4), steps_per_epoch=10)
        'lr one-cycle: up from 0.002 to 0.05 over steps 1-10 (epoch 1), then down towards 0'
    """
    total = config.epochs * steps_per_epoch
    if config.resolved_schedule == "onecycle":
        peak = max(1, round(ONECYCLE_WARMUP * total))
        return (
            f"lr one-cycle: up from {config.lr / 25:.3g} to {config.lr:g} over steps 1-{peak} "
            f"(epoch{_plural(_epoch_of_step(peak, steps_per_epoch))}), then down towards 0"
        )
    steps = milestone_steps(config.resolved_milestones, total)
    steps = [s for s in steps if s < total]  # a drop after the last step changes nothing
    if not steps:
        return f"lr {config.lr:g}, constant"
    epochs = [_epoch_of_step(s + 1, steps_per_epoch) for s in steps]
    drops = {epoch: epochs.count(epoch) for epoch in epochs}
    if len(drops) == len(epochs):
        when = f"x0.1 in epoch{_plural(*epochs)}"
    else:  # several drops within one epoch (a short run)
        when = " and ".join(
            f"x0.1{_TIMES.get(count, f' {count} times')} in epoch {epoch}"
            for epoch, count in drops.items()
        )
    return f"lr {config.lr:g}, {when} (after step{_plural(*steps)} of {total})"


_TIMES = {1: "", 2: " twice"}


def _epoch_of_step(step: int, steps_per_epoch: int) -> int:
    """The 1-based epoch holding the 1-based optimiser step ``step``."""
    return (step - 1) // max(1, steps_per_epoch) + 1


def _plural(*numbers: int) -> str:
    words = [str(n) for n in numbers]
    if len(words) == 1:
        return f" {words[0]}"
    return "s " + ", ".join(words[:-1]) + " and " + words[-1]


def lr_schedule_help() -> str:
    """The schedule rules in words, for ``--help`` (no run length needed)."""
    drops = " and ".join(f"{100 * f:g}%" for f in DEFAULT_MILESTONES)
    onecycle = [m for m, r in METHOD_RECIPES.items() if r.schedule == "onecycle"]
    return (
        f"The learning rate changes per batch: x0.1 after {drops} of the steps "
        f"({', '.join(m for m in METHOD_NAMES if m not in onecycle)}); "
        f"{', '.join(onecycle)}: one-cycle, rising from --lr/25 to --lr over the first "
        f"{100 * ONECYCLE_WARMUP:g}% of the steps, then annealing towards 0. --milestones "
        "sets other fractions and makes every method's schedule piecewise. The run's log "
        "prints the epochs where the rate drops."
    )
