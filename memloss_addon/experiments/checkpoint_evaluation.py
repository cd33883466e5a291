"""Evaluating the model of a training checkpoint on its test set (what ``memloss eval`` runs).

:func:`evaluate_checkpoint` takes a checkpoint written by ``memloss train``;
:func:`evaluate_reference_checkpoint` one published by TRADES, MART, HAT or robust_overfitting,
loaded into the architecture named (:mod:`~memloss_addon.experiments.reference_weights`).

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

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
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
from memloss_addon.experiments.names import (
    ModelName,
    ModelState,
    NormalizationName,
    ReferenceSource,
)

__all__ = [
    "CheckpointEvaluation",
    "evaluate_checkpoint",
    "evaluate_reference_checkpoint",
    "reference_defaults",
]


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
    return _evaluate_network(
        model,
        test_set,
        eps=float(state["config"]["eps"]) if eps is None else eps,
        attacks=attacks,
        pgd_steps=pgd_steps,
        autoattack=autoattack,
        eval_samples=eval_samples,
        progress=progress,
        weights=weights,
        epoch=int(state["best"]["epoch"]) if weights == "best" else int(state["epoch"]),
    )


def reference_defaults(source: ReferenceSource, dataset: str) -> tuple[NormalizationName, float]:
    """The input normalization and the eps a published checkpoint of ``source`` is evaluated
    with by default: TRADES and MART train and evaluate unnormalized inputs at eps 0.031
    (``train_trades_cifar10.py`` line 30), HAT at 8/255 on unnormalized inputs (its default
    ``--normalize false``), robust_overfitting at 8/255 normalized with the dataset's statistics.

    Example:
        >>> reference_defaults("robust_overfitting", "cifar100")
        ('cifar100', 0.03137254901960784)
    """
    if source in ("trades", "mart"):
        return "identity", 0.031
    if source == "hat":
        return "identity", 8 / 255
    normalization: NormalizationName = "cifar10"
    if dataset in ("cifar100", "svhn"):
        normalization = "cifar100" if dataset == "cifar100" else "svhn"
    return normalization, 8 / 255


def evaluate_reference_checkpoint(
    path: str | os.PathLike[str],
    test_set: Dataset[Any],
    *,
    source: ReferenceSource,
    model: ModelName,
    num_classes: int,
    sample_shape: tuple[int, int, int] = (3, 32, 32),
    normalization: NormalizationName | None = None,
    base_width: int | None = None,
    widen_factor: int | None = None,
    dataset: str = "cifar10",
    eps: float | None = None,
    attacks: Sequence[AttackName] = ATTACK_NAMES,
    pgd_steps: int = 20,
    autoattack: AutoAttackPreset = "standard",
    eval_samples: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> CheckpointEvaluation:
    """Evaluate a checkpoint published by a reference repository.

    The model is built as ``model`` with ``normalization`` (default: :func:`reference_defaults`)
    and the widths given, the checkpoint's keys are mapped onto it with
    :func:`~.reference_weights.load_reference_checkpoint` (which refuses a normalization that
    contradicts the checkpoint's layout), and :func:`~.evaluate.evaluate` runs in eval mode.

    Args:
        path: The published file (``torch.load`` with ``weights_only=True``).
        test_set: The test set to evaluate on (items ``(x, y)``, pixels in ``[0, 1]``).
        source: ``"trades"``, ``"mart"``, ``"hat"`` or ``"robust_overfitting"``.
        model: The architecture it holds (``"wrn-34-10"``, ``"resnet18"``, ...).
        num_classes: Its number of classes.
        dataset: The dataset's name, for the default normalization.
        eps: L-inf radius (``None``: the source's, see :func:`reference_defaults`).

    Raises:
        ValueError: A checkpoint that does not fit the model, or a contradicting normalization.
        FileNotFoundError: No file at ``path``.
    """
    from memloss_addon.experiments.models import build_model
    from memloss_addon.experiments.reference_weights import load_reference_checkpoint

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {os.fspath(path)!r} does not exist")
    default_normalization, default_eps = reference_defaults(source, dataset)
    network = build_model(
        model,
        sample_shape=sample_shape,
        num_classes=num_classes,
        normalization=default_normalization if normalization is None else normalization,
        base_width=base_width,
        widen_factor=widen_factor,
    )
    load_reference_checkpoint(network, path, source=source)
    network = network.to(torch.device(device)).eval()
    return _evaluate_network(
        network,
        test_set,
        eps=default_eps if eps is None else eps,
        attacks=attacks,
        pgd_steps=pgd_steps,
        autoattack=autoattack,
        eval_samples=eval_samples,
        progress=progress,
    )


def _evaluate_network(
    network: nn.Module,
    test_set: Dataset[Any],
    *,
    eps: float,
    attacks: Sequence[AttackName],
    pgd_steps: int,
    autoattack: AutoAttackPreset,
    eval_samples: int | None,
    progress: bool,
    weights: ModelState = "last",
    epoch: int | None = None,
) -> CheckpointEvaluation:
    """Scores ``network`` on the first ``eval_samples`` of ``test_set``."""
    test = first_samples(test_set, eval_samples)
    accuracy = evaluate(
        network,
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
        epoch=epoch,
    )
