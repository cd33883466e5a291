"""The settings of an evaluation, checked once: attacks, radius, PGD steps, AutoAttack counts, seed.

Example:
    >>> settings = EvaluationSettings(eps=0.1, attacks=["clean", "pgd"], pgd_steps=10)
    >>> settings.attacks, settings.step_size
    (('clean', 'pgd'), 0.025)
    >>> autoattack_config("fast").square_queries
    100
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from memloss_addon.checks import check_choice, finite_number, positive_int
from memloss_addon.experiments.attacks import AutoAttackConfig, LogitsFn
from memloss_addon.experiments.names import (
    ATTACK_NAMES,
    AUTOATTACK_PRESETS,
    AttackName,
    AutoAttackPreset,
)

__all__ = [
    "ATTACK_NAMES",
    "AUTOATTACK_PRESETS",
    "AttackName",
    "AutoAttackPreset",
    "EvaluationSettings",
    "autoattack_config",
]


def autoattack_config(preset: AutoAttackPreset) -> AutoAttackConfig:
    """The AutoAttack counts of ``preset``: ``"standard"`` (the reference's) or ``"fast"``.

    ``"fast"`` is for smoke tests only: its numbers are not comparable with published ones.
    """
    check_choice("autoattack", preset, AUTOATTACK_PRESETS)
    return AutoAttackConfig.fast() if preset == "fast" else AutoAttackConfig()


@dataclass(frozen=True, kw_only=True)
class EvaluationSettings:
    """How :func:`~memloss_addon.experiments.evaluate.evaluate` attacks; checked on creation.

    Attributes:
        eps: L-inf radius (> 0).
        attacks: Accuracies to measure, distinct names of :data:`ATTACK_NAMES`, in the order the
            result lists them; any sequence is stored as a tuple.
        pgd_steps: Steps of PGD and CW-PGD.
        pgd_step_size: Their step size (``None``: ``2.5 * eps / pgd_steps``).
        random_start: Whether PGD and CW-PGD start from a uniform point in the ball.
        autoattack: AutoAttack iteration counts (``None``: the reference's).
        logits_fn: Maps the model's output to logits (``None``: the output is the logits).
        seed: Seed of all attack randomness.

    Raises:
        TypeError: If ``attacks`` is a string, or a number has the wrong type.
        ValueError: For an unknown, repeated or missing attack name, or a bad ``eps`` or step
            setting.
    """

    eps: float
    attacks: Sequence[AttackName] = ("clean", "pgd", "cw")
    pgd_steps: int = 20
    pgd_step_size: float | None = None
    random_start: bool = True
    autoattack: AutoAttackConfig | None = None
    logits_fn: LogitsFn | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.attacks, str):
            raise TypeError(f"attacks must be a sequence of names, not the string {self.attacks!r}")
        object.__setattr__(self, "attacks", tuple(self.attacks))
        for name in self.attacks:
            check_choice("attack", name, ATTACK_NAMES)
        if not self.attacks:
            raise ValueError("attacks must name at least one of " + ", ".join(ATTACK_NAMES))
        if len(set(self.attacks)) != len(self.attacks):
            raise ValueError(f"attacks contains a repeated name: {list(self.attacks)!r}")
        finite_number("eps", self.eps, positive=True)
        positive_int("pgd_steps", self.pgd_steps)
        if self.pgd_step_size is not None:
            finite_number("pgd_step_size", self.pgd_step_size, positive=True)

    @property
    def step_size(self) -> float:
        """The step size of PGD and CW-PGD in use."""
        if self.pgd_step_size is None:
            return 2.5 * self.eps / self.pgd_steps
        return self.pgd_step_size
