"""Checkpoints of a :class:`~memloss_addon.experiments.training.TrainingRun`: contents, file, RNG.

A checkpoint holds everything needed to continue a run: its config and dataset description, the
model, optimiser, schedule, memory and HAT helper, the epoch counter and history, the best
weights by held-out PGD-20 (with ``holdout``), and the random generators' states (torch CPU and
CUDA, Python ``random``), so that a resumed run continues exactly as an uninterrupted one would
(bit-identical on CPU). It is written atomically (a crash mid-write leaves the previous file
intact) and read back with ``weights_only=True``.

Example:
    >>> import random, tempfile, pathlib
    >>> rng = capture_rng_state()
    >>> first = random.random()
    >>> restore_rng_state(rng)
    >>> random.random() == first
    True
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "other.pt"
    >>> save_checkpoint({"format": "something else"}, target)
    >>> load_checkpoint(target)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: '...' is not a memloss training checkpoint (format 'something else', ...)
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from memloss_addon.checks import check_choice
from memloss_addon.experiments.datasets import DatasetSplits, load_dataset
from memloss_addon.experiments.models import build_model
from memloss_addon.experiments.names import MODEL_STATES, ModelState
from memloss_addon.experiments.training_setup import freeze
from memloss_addon.store.files import atomic_write

if TYPE_CHECKING:
    from memloss_addon.experiments.training import TrainingRun

__all__ = [
    "CHECKPOINT_FORMAT",
    "capture_rng_state",
    "load_checkpoint",
    "model_from_checkpoint",
    "recorded_dataset",
    "restore_rng_state",
    "restore_training_state",
    "save_checkpoint",
    "training_state",
]

CHECKPOINT_FORMAT = "memloss-training-checkpoint/1"


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


def capture_rng_state() -> dict[str, Any]:
    """The states of the torch CPU (and, when present, CUDA) and Python ``random`` generators."""
    rng: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng_state(rng: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` returned (CUDA only when it was saved and present)."""
    torch.set_rng_state(rng["torch"])
    random.setstate(_as_python_rng_state(rng["python"]))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _as_python_rng_state(state: Any) -> tuple[Any, ...]:
    # random.setstate needs tuples; a checkpoint may hand back lists.
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def training_state(run: TrainingRun) -> dict[str, Any]:
    """Everything needed to continue ``run``, as tensors and primitives only."""
    rng = capture_rng_state()
    splits = run.splits
    return {
        "format": CHECKPOINT_FORMAT,
        "config": run.config.to_dict(),
        "dataset": {
            "name": splits.name,
            "num_classes": splits.num_classes,
            "sample_shape": list(splits.sample_shape),
            "num_train": len(splits.train),
            "synthetic": splits.synthetic,
            "split_seed": splits.split_seed,
            "augment": splits.augment,
        },
        "model_name": run.model_name,
        "epoch": run.epoch,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "memory": None if run.memory is None else run.memory.state_dict(),
        "helper": None if run.helper is None else run.helper.state_dict(),
        "helper_trained": run.helper_trained,
        "best": run.best,
        "rng": rng,
        "history": list(run.history),
        "torch_version": str(torch.__version__),
    }


def restore_training_state(run: TrainingRun, state: dict[str, Any]) -> None:
    """Load :func:`training_state`'s output into ``run``, the global RNG states included.

    Raises:
        ValueError: If ``state`` is not a training checkpoint, or was written for another config
            or dataset.
    """
    _check_same_run(run, state)
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.memory is not None:
        run.memory.load_state_dict(state["memory"])
    if run.helper is not None:
        run.helper.load_state_dict(state["helper"])
        run.helper_trained = bool(state["helper_trained"])
        if run.helper_trained:
            freeze(run.helper)
    run.epoch = int(state["epoch"])
    run.history = list(state["history"])
    run.best = state.get("best")  # older checkpoints have none
    restore_rng_state(state["rng"])


def _check_same_run(run: TrainingRun, state: dict[str, Any]) -> None:
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"not a training checkpoint: format {state.get('format')!r}")
    if state["config"] != run.config.to_dict():
        raise ValueError("checkpoint config differs from this run's config")
    recorded, splits = state["dataset"], run.splits
    if recorded["name"] != splits.name or recorded["num_train"] != len(splits.train):
        raise ValueError(
            f"checkpoint was written for dataset {recorded['name']!r} with "
            f"{recorded['num_train']} training samples, not {splits.name!r} "
            f"with {len(splits.train)}"
        )


def recorded_dataset(state: dict[str, Any], *, data_dir: str | Path = "data") -> DatasetSplits:
    """Load the dataset a checkpoint was trained on (same split seed and augmentation).

    Raises:
        DatasetNotFoundError: If it is a local dataset whose files are not in ``data_dir``.
        ImportError: If reading it needs an optional package that is missing.
    """
    recorded = state["dataset"]
    return load_dataset(
        recorded["name"],
        data_dir=data_dir,
        split_seed=recorded["split_seed"],
        augment=recorded["augment"],
    )


def model_from_checkpoint(
    state: dict[str, Any], *, device: str | torch.device = "cpu", weights: ModelState = "last"
) -> nn.Module:
    """The trained model of a checkpoint, on ``device``, in training mode as built.

    Args:
        state: A checkpoint, as :func:`load_checkpoint` returns it.
        device: Where the model goes.
        weights: ``"last"``: the weights after the last epoch trained; ``"best"``: those of the
            epoch with the best held-out PGD-20 accuracy (a run trained with ``holdout``).

    Raises:
        ValueError: For ``"best"`` when the checkpoint holds no best weights.
    """
    check_choice("weights", weights, MODEL_STATES)
    recorded = state["dataset"]
    config = state["config"]
    options = {  # the paper-scale architectures' options (absent from older checkpoints)
        key: config[key]
        for key in ("normalization", "base_width", "widen_factor")
        if config.get(key) is not None
    }
    model = build_model(
        state["model_name"],
        sample_shape=tuple(recorded["sample_shape"]),
        num_classes=recorded["num_classes"],
        **options,
    )
    if weights == "best":
        best = state.get("best")
        if best is None:
            raise ValueError(
                "the checkpoint holds no best weights: they are kept by runs trained with a "
                "held-out split (--holdout N)"
            )
        model.load_state_dict(best["model"])
    else:
        model.load_state_dict(state["model"])
    return model.to(torch.device(device))
