"""The settings of a comparison: which methods, seeds and evaluations, and each run's config.

Example:
    >>> config = CompareConfig(methods=("trades",), seeds=(0, 1))
    >>> config.train_config("trades", memory=True, seed=1).beta_prime, config.robust_attack
    (2.0, 'autoattack')
    >>> CompareConfig.quick().epochs
    2

The module imports no torch (the argument checks import it when a config is made), so the
``memloss`` command's parser can show the defaults in ``--help``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from memloss_addon.experiments.names import (
    ATTACK_INITS,
    ATTACK_NAMES,
    AUTOATTACK_PRESETS,
    METHOD_NAMES,
    AttackInit,
    AttackName,
    AutoAttackPreset,
    MethodName,
)
from memloss_addon.experiments.train_config import TrainConfig

__all__ = ["QUICK", "CompareConfig", "compare_default"]

QUICK: dict[str, Any] = {
    "seeds": (0,),
    "epochs": 2,
    "steps": 3,
    "helper_epochs": 1,
    "pgd_steps": 5,
    "autoattack": "fast",
    "eval_samples": 100,
}
"""What :meth:`CompareConfig.quick` changes from the defaults."""


@dataclass(frozen=True, kw_only=True)
class CompareConfig:
    """Settings of a comparison; the defaults are the ones ``memloss compare`` uses on digits.

    Attributes:
        methods: Base methods to compare.
        seeds: Seeds; each method trains once per seed with and once without MemLoss.
        epochs: Adversarial training epochs per run.
        eps: L-inf radius for training and evaluation, in ``[0, 1]`` pixel units.
        steps: Training attack steps (step size ``eps / 4``; single-step uses one FGSM step).
        lr: Base learning rate.
        batch_size: Training batch size.
        beta_prime: MemLoss weight beta'.
        helper_epochs: Cross-entropy epochs for HAT's helper.
        attacks: Evaluations to run (names of :func:`memloss_addon.experiments.evaluate.evaluate`).
        pgd_steps: Steps of the PGD and CW evaluations.
        autoattack: ``"standard"`` (the reference counts) or ``"fast"`` (10 iterations,
            3 targets, 100 Square queries: for smoke tests; not comparable with published numbers).
        eval_samples: Evaluate on the first this many test images (``None``: all).
        device: Training and evaluation device.
        attack_init: Where the training attacks start (both arms), see :class:`TrainConfig`.
        attack_reset_every: Restart memory-started attacks every this many epochs.
        replay_fraction: Fraction of memory rows the MemLoss term replays.
        diagnostics: Memory diagnostics in both arms (the base arm keeps a memory of weight 0).
        milestones: Learning-rate drop fractions (``None``: each method's recipe).
        holdout: Training samples held out to select the best epoch by PGD-20; with it each run
            is evaluated at its last and at its best epoch.
        curve_samples: Test samples of the per-epoch clean and PGD-20 curve (``None``: none).

    Raises:
        TypeError: If a number has the wrong type.
        ValueError: If a value is out of range, unknown or repeated, or ``attacks`` lacks
            ``"clean"`` or an attack.
    """

    methods: tuple[MethodName, ...] = METHOD_NAMES
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 15
    eps: float = 0.15
    steps: int = 10
    lr: float = 0.05
    batch_size: int = 128
    beta_prime: float = 2.0
    helper_epochs: int = 5
    attacks: tuple[AttackName, ...] = ("clean", "pgd", "autoattack")
    pgd_steps: int = 20
    autoattack: AutoAttackPreset = "standard"
    eval_samples: int | None = None
    device: str = "cpu"
    attack_init: AttackInit = "random"
    attack_reset_every: int | None = None
    replay_fraction: float = 1.0
    diagnostics: bool = False
    milestones: tuple[float, ...] | None = None
    holdout: int = 0
    curve_samples: int | None = None

    def __post_init__(self) -> None:
        # Imported here: the checks import torch, and the command's --help reads this module.
        from memloss_addon.checks import check_choice, finite_number, positive_int

        if not self.methods:
            raise ValueError(f"methods must name at least one of {METHOD_NAMES}")
        for method in self.methods:
            check_choice("method", method, METHOD_NAMES)
        _check_distinct("methods", self.methods)
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        _check_distinct("seeds", self.seeds)
        for name in ("epochs", "steps", "batch_size", "pgd_steps"):
            positive_int(name, getattr(self, name))
        positive_int("helper_epochs", self.helper_epochs, minimum=0)
        finite_number("eps", self.eps, positive=True)
        finite_number("lr", self.lr, positive=True)
        for attack in self.attacks:
            check_choice("attack", attack, ATTACK_NAMES)
        _check_distinct("attacks", self.attacks)
        if "clean" not in self.attacks or len(self.attacks) < 2:
            raise ValueError(
                f"attacks must hold 'clean' and at least one attack, got {self.attacks}"
            )
        check_choice("autoattack", self.autoattack, AUTOATTACK_PRESETS)
        if self.eval_samples is not None:
            positive_int("eval_samples", self.eval_samples)
        check_choice("attack_init", self.attack_init, ATTACK_INITS)
        # The training options are checked by TrainConfig, once, as each run's config would be.
        example = self.train_config(self.methods[0], memory=True, seed=self.seeds[0])
        object.__setattr__(self, "milestones", example.milestones)  # a list becomes a tuple

    @classmethod
    def quick(cls) -> CompareConfig:
        """A smoke-test configuration (:data:`QUICK`): 2 epochs, 1 seed, 3 attack steps, fast
        AutoAttack and 100 test images; it checks the pipeline, its numbers mean little."""
        return cls(**QUICK)

    def train_config(self, method: MethodName, *, memory: bool, seed: int) -> TrainConfig:
        """The :class:`TrainConfig` of one run."""
        return TrainConfig(
            method=method,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            eps=self.eps,
            steps=self.steps,
            helper_epochs=self.helper_epochs,
            memory=memory,
            beta_prime=self.beta_prime,
            device=self.device,
            seed=seed,
            attack_init=self.attack_init,
            attack_reset_every=self.attack_reset_every,
            replay_fraction=self.replay_fraction,
            diagnostics=self.diagnostics,
            milestones=self.milestones,
            holdout=self.holdout,
            curve_samples=self.curve_samples,
        )

    @property
    def robust_attacks(self) -> tuple[AttackName, ...]:
        """The attacks run, weakest first (one panel each in the trade-off plot)."""
        order: tuple[AttackName, ...] = ("pgd", "cw", "autoattack")
        return tuple(name for name in order if name in self.attacks)

    @property
    def robust_attack(self) -> AttackName:
        """The attack the trade-off plot uses: the strongest one run."""
        strongest_first: tuple[AttackName, ...] = ("autoattack", "cw", "pgd")
        for name in strongest_first:
            if name in self.attacks:
                return name
        raise ValueError("no attack configured")  # unreachable after __post_init__


def compare_default(name: str) -> Any:
    """The default of a :class:`CompareConfig` field, without making a config (no torch).

    Example:
        >>> compare_default("epochs"), compare_default("seeds")
        (15, (0, 1, 2))
    """
    for field in dataclasses.fields(CompareConfig):
        if field.name == name:
            return field.default
    raise KeyError(name)


def _check_distinct(name: str, values: tuple[object, ...]) -> None:
    if len(set(values)) != len(values):
        raise ValueError(f"{name} contains a repeat: {values!r}")
