"""Evaluating the model of a training checkpoint on its test set (what ``memloss eval`` runs).

Example:
    >>> import tempfile, pathlib
    >>> from memloss_addon.experiments.checkpoints import load_checkpoint, recorded_dataset
    >>> from memloss_addon.experiments.datasets import load_digits
    >>> from memloss_addon.experiments.train_config import TrainConfig
    >>> from memloss_addon.experiments.training import TrainingRun
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "checkpoint.pt"
    >>> TrainingRun(TrainConfig(method="pgd_at", epochs=1), load_digits()).save(path)
    >>> state = load_checkpoint(path)
    >>> result = evaluate_checkpoint(
    ...     state, recorded_dataset(state).test, attacks=["clean"], eval_samples=50, progress=False
    ... )
    >>> result.num_eval, result.eps, list(result.accuracy)
    (50, 0.1, ['clean'])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from memloss_addon.experiments.checkpoints import model_from_checkpoint
from memloss_addon.experiments.evaluate import evaluate
from memloss_addon.experiments.evaluation_data import first_samples, sample_count
from memloss_addon.experiments.evaluation_settings import (
    ATTACK_NAMES,
    AttackName,
    AutoAttackPreset,
    autoattack_config,
)
from memloss_addon.experiments.names import ModelState

__all__ = ["CheckpointEvaluation", "evaluate_checkpoint"]


@dataclass(frozen=True)
class CheckpointEvaluation:
    """The accuracies of a checkpoint's model and how they were measured.

    Attributes:
        eps: L-inf radius of the attacks.
        num_eval: Test samples evaluated.
        pgd_steps: Steps of the PGD and CW evaluations.
        autoattack: AutoAttack iteration counts by name.
        accuracy: ``{attack name: accuracy}``, fractions in [0, 1], in the order asked for.
        weights: Which weights were evaluated: ``"last"`` or ``"best"``.
        epoch: The epoch those weights are from.
    """

    eps: float
    num_eval: int
    pgd_steps: int
    autoattack: AutoAttackPreset
    accuracy: dict[str, float]
    weights: ModelState = "last"
    epoch: int | None = None


def evaluate_checkpoint(
    state: dict[str, Any],
    test_set: Dataset[Any],
    *,
    eps: float | None = None,
    attacks: Sequence[AttackName] = ATTACK_NAMES,
    pgd_steps: int = 20,
    autoattack: AutoAttackPreset = "standard",
    eval_samples: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    weights: ModelState = "last",
) -> CheckpointEvaluation:
    """Evaluate the model of a loaded checkpoint with :func:`~.evaluate.evaluate`.

    Args:
        state: A checkpoint, as :func:`~.checkpoints.load_checkpoint` returns it.
        test_set: Its test set, e.g. ``recorded_dataset(state).test``.
        eps: L-inf radius (``None``: the one the model was trained with).
        attacks: Accuracies to measure (default: all of :data:`ATTACK_NAMES`).
        pgd_steps: Steps of the PGD and CW evaluations.
        autoattack: ``"standard"`` (the reference counts) or ``"fast"`` (smoke tests only).
        eval_samples: Evaluate on the first this many test samples (``None``: all).
        device: Where the model runs.
        progress: Show a progress bar when tqdm is installed (it moves after each attack).
        weights: ``"last"`` (the last epoch's weights) or ``"best"`` (the best epoch's by
            held-out PGD-20, kept by runs trained with a held-out split).

    Raises:
        TypeError: For a setting of the wrong type.
        ValueError: For a bad setting (see :func:`~.evaluate.evaluate`), or ``"best"`` weights
            the checkpoint does not hold.
        ImportError: For AutoAttack when torchattacks is not installed.
    """
    model = model_from_checkpoint(state, device=device, weights=weights)
    eps = float(state["config"]["eps"]) if eps is None else eps
    test = first_samples(test_set, eval_samples)
    accuracy = evaluate(
        model,
        DataLoader(test, batch_size=512),
        eps=eps,
        attacks=attacks,
        pgd_steps=pgd_steps,
        autoattack=autoattack_config(autoattack),
        progress=progress,
    )
    return CheckpointEvaluation(
        eps=eps,
        num_eval=sample_count(test),
        pgd_steps=pgd_steps,
        autoattack=autoattack,
        accuracy=accuracy,
        weights=weights,
        epoch=int(state["best"]["epoch"]) if weights == "best" else int(state["epoch"]),
    )
