"""Per-attack accuracy counts, batch after batch: clean, PGD, CW-PGD and the AutoAttack chain.

An :class:`AttackScorer` runs each attack of its :class:`EvaluationSettings` on every batch it is
given and counts the samples still classified correctly. It attacks the model as it finds it: the
caller puts it in eval mode and guards its state
(:func:`memloss_addon.experiments.evaluate.evaluate` does both).

Example:
    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).eval()
    >>> scorer = AttackScorer(net, EvaluationSettings(eps=0.1, attacks=["clean", "pgd"]))
    >>> scorer.add(*split_batch((torch.rand(8, 1, 2, 2), torch.randint(0, 3, (8,))), None))
    >>> scorer.total, sorted(scorer.accuracies())
    (8, ['clean', 'pgd'])

A progress callback hears of every unit of work as it starts and ends (clean, PGD, CW-PGD, and
each AutoAttack sub-attack), so a progress bar can move during a long evaluation:

    >>> steps = []
    >>> scorer = AttackScorer(net, EvaluationSettings(eps=0.1, attacks=["clean", "pgd"]),
    ...                       on_step=lambda name, finished: steps.append((name, finished)))
    >>> scorer.units_per_batch
    2
    >>> scorer.add(*split_batch((torch.rand(8, 1, 2, 2), torch.randint(0, 3, (8,))), None))
    >>> steps
    [('clean', False), ('clean', True), ('pgd', False), ('pgd', True)]
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from memloss_addon.experiments.attacks import (
    AUTOATTACK_NAMES,
    build_autoattack,
    model_logits,
    pgd_linf,
    predict_labels,
    run_attack_chain,
)
from memloss_addon.experiments.evaluation_settings import EvaluationSettings

__all__ = ["AttackScorer", "StepCallback", "split_batch", "units_per_batch"]

logger = logging.getLogger(__name__)

_Attack = Callable[[Tensor, Tensor], Tensor]

StepCallback = Callable[[str, bool], None]
"""Called with a unit's name (``"clean"``, ``"pgd"``, ``"cw"`` or an AutoAttack sub-attack of
:data:`~memloss_addon.experiments.attacks.AUTOATTACK_NAMES`) and ``False`` as it starts, ``True``
when it is done."""


class AttackScorer:
    """Counts, per attack of ``settings``, the samples the model still classifies correctly.

    The attacks run in a fixed order on each batch (clean, PGD, CW-PGD, AutoAttack) whatever the
    order of ``settings.attacks``. PGD draws its random starts from a generator seeded with
    ``seed`` and CW-PGD from one seeded with ``seed + 1``, both made on the first batch's device;
    the AutoAttack chain is built on the first batch that needs it.

    Args:
        model: The classifier, already in the mode to evaluate in.
        settings: What to measure and how.
        on_step: Told of each unit of work as it starts and ends (:data:`StepCallback`); every
            batch runs :attr:`units_per_batch` units, an AutoAttack sub-attack with no sample left
            to attack included (it starts and ends at once).
    """

    def __init__(
        self, model: nn.Module, settings: EvaluationSettings, on_step: StepCallback | None = None
    ) -> None:
        self.model = model
        self.settings = settings
        self.correct: dict[str, int] = dict.fromkeys(settings.attacks, 0)
        self.total = 0
        self._generators: dict[str, torch.Generator] = {}
        self._chain: list[_Attack] | None = None
        self._on_step = on_step
        self._ran: set[str] = set()

    @property
    def units_per_batch(self) -> int:
        """Units of work per batch: one per attack name, the AutoAttack sub-attacks one each."""
        return sum(len(AUTOATTACK_NAMES) if name == "autoattack" else 1 for name in self.correct)

    def _step(self, name: str, finished: bool) -> None:
        if self._on_step is not None:
            self._on_step(name, finished)

    def add(self, x: Tensor, y: Tensor) -> None:
        """Attack one batch of inputs ``x`` (N, ...) with labels ``y`` (N,) and count the hits."""
        if not self._generators:
            seed = self.settings.seed
            self._generators = {
                "pgd": torch.Generator(device=x.device).manual_seed(seed),
                "cw": torch.Generator(device=x.device).manual_seed(seed + 1),
            }
        if "clean" in self.correct:
            self._step("clean", False)
        with torch.no_grad():
            logits = model_logits(self.model, x, self.settings.logits_fn)
        if "clean" in self.correct:
            self.correct["clean"] += int((logits.argmax(dim=1) == y).sum())
            self._step("clean", True)
        for name in ("pgd", "cw"):
            if name in self.correct:
                self._step(name, False)
                self.correct[name] += self._pgd_correct(name, x, y)
                self._step(name, True)
        if "autoattack" in self.correct:
            self.correct["autoattack"] += self._autoattack_correct(x, y, logits.shape[1])
        self.total += y.shape[0]

    def running_accuracies(self) -> dict[str, float]:
        """The accuracies over the batches added so far (0 before any)."""
        return {name: count / max(self.total, 1) for name, count in self.correct.items()}

    def accuracies(self) -> dict[str, float]:
        """``{name: accuracy}`` over all batches added, in the order of ``settings.attacks``.

        Raises:
            ValueError: If no samples were added.
        """
        if self.total == 0:
            raise ValueError("loader yielded no samples")
        return {name: count / self.total for name, count in self.correct.items()}

    def _pgd_correct(self, name: str, x: Tensor, y: Tensor) -> int:
        settings = self.settings
        adv = pgd_linf(
            self.model,
            x,
            y,
            eps=settings.eps,
            step_size=settings.step_size,
            steps=settings.pgd_steps,
            loss="ce" if name == "pgd" else "cw",
            random_start=settings.random_start,
            generator=self._generators[name],
            logits_fn=settings.logits_fn,
        )
        return int((predict_labels(self.model, adv, settings.logits_fn) == y).sum())

    def _autoattack_correct(self, x: Tensor, y: Tensor, n_classes: int) -> int:
        if x.dim() != 4:
            raise ValueError(
                f"AutoAttack expects image batches of shape (N, C, H, W), got {tuple(x.shape)}"
            )
        settings = self.settings
        if self._chain is None:
            chain = build_autoattack(
                self.model,
                eps=settings.eps,
                n_classes=n_classes,
                config=settings.autoattack,
                seed=settings.seed,
                logits_fn=settings.logits_fn,
                device=x.device,
            )
            self._chain = [self._reporting(name, attack) for name, attack in chain]
        self._ran = set()
        result = run_attack_chain(
            self.model, x, y, self._chain, eps=settings.eps, logits_fn=settings.logits_fn
        )
        for name in AUTOATTACK_NAMES:  # skipped: no sample left to attack
            if name not in self._ran:
                self._step(name, False)
                self._step(name, True)
        logger.debug(
            "AutoAttack robust counts after clean, %s: %s",
            ", ".join(AUTOATTACK_NAMES),
            result.remaining,
        )
        return int(result.robust.sum())

    def _reporting(self, name: str, attack: _Attack) -> _Attack:
        def run(x: Tensor, y: Tensor) -> Tensor:
            self._ran.add(name)
            self._step(name, False)
            adv = attack(x, y)
            self._step(name, True)
            return adv

        return run


def units_per_batch(settings: EvaluationSettings) -> int:
    """The units of work :class:`AttackScorer` reports per batch for ``settings``.

    Example:
        >>> units_per_batch(EvaluationSettings(eps=0.1, attacks=["clean", "pgd", "autoattack"]))
        6
    """
    return sum(len(AUTOATTACK_NAMES) if name == "autoattack" else 1 for name in settings.attacks)


def split_batch(batch: Any, device: torch.device | None) -> tuple[Tensor, Tensor]:
    """The inputs and integer labels of a batch ``(x, y)`` or ``(x, y, ...)``, on ``device``.

    Raises:
        TypeError: If the batch is not such a tuple or list of tensors.
        ValueError: If the labels are not one per input.
    """
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise TypeError(
            f"each batch must be a tuple (x, y) or (x, y, ...), got {type(batch).__name__}"
        )
    x, y = batch[0], batch[1]
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(
            f"batch inputs and labels must be tensors, got {type(x).__name__} and "
            f"{type(y).__name__}"
        )
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    if device is not None:
        x, y = x.to(device), y.to(device)
    return x, y.long()
