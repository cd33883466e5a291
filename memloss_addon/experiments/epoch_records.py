"""Per-epoch records of training runs: :class:`EpochStats`, its JSON-lines and CSV files, the plot.

One record per epoch, with the columns of :data:`EPOCH_COLUMNS` (the fields of
:class:`EpochStats`, in order); a figure that was not measured (no memory, no curve, no held-out
split) is ``None`` in JSON and an empty cell in the CSV. ``memloss train`` writes
``epochs.jsonl`` and ``epochs.csv`` after every epoch; ``memloss compare --diagnostics`` writes
them for all runs with the columns of :data:`RUN_COLUMNS` first.

The module imports no torch; the plot needs matplotlib.

Example:
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> jsonl, csv_path = write_epoch_records([{"epoch": 1, "loss": 0.5}], folder)
    >>> csv_path.read_text().splitlines()[0].split(",")[:4]
    ['epoch', 'loss', 'memory_term', 'memory_mean_term']
    >>> csv_path.read_text().splitlines()[1].split(",")[:3]
    ['1', '0.5', '']
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "EPOCH_COLUMNS",
    "JSONL_FILE",
    "CSV_FILE",
    "PLOT_FILE",
    "RUN_COLUMNS",
    "EpochStats",
    "forgetting_rate",
    "plot_epoch_curves",
    "write_epoch_records",
]

JSONL_FILE = "epochs.jsonl"
CSV_FILE = "epochs.csv"
PLOT_FILE = "diagnostics.png"


@dataclass(frozen=True)
class EpochStats:
    """What one epoch reports.

    Attributes:
        epoch: Epochs completed (1-based).
        loss: Mean base-objective loss per sample.
        memory_term: Mean MemLoss term per training sample (0 without MemLoss, and in epoch 1).
        memory_mean_term: The memory's mean term over the epoch's calls that computed one
            (``memory.epoch_stats()["mean_term"]``; ``None`` when none did).
        memory_mean_weight: Mean weight ``1 - p_y`` of the memory rows replayed (``None``: none).
        memory_accuracy: Fraction of the memory rows read that the current model classifies
            correctly (diagnostics; ``None`` without them or before the memory holds anything).
        rows_classified: Memory rows classified by the diagnostics this epoch.
        rows_forgotten: ... that did not fool the model when stored and fool it now.
        rows_recovered: ... that fooled the model when stored and are classified correctly now.
        rows_skipped: Filled memory rows selective replay left out of the term.
        train_clean_accuracy: Accuracy of the clean logits seen during training.
        test_clean_accuracy: Clean accuracy on the whole test set after the epoch.
        curve_clean_accuracy: Clean accuracy on the first ``curve_samples`` test samples.
        curve_pgd_accuracy: PGD-20 accuracy on the same samples (the robust-overfitting curve).
        holdout_pgd_accuracy: PGD-20 accuracy on the held-out training samples.
        attack_from_memory: Whether this epoch's attacks started from the memory.
        lr: Learning rate at the end of the epoch.
        seconds: Wall-clock time of the epoch's training (evaluations not included).
        cpu_seconds: Process CPU time of the epoch's training, all threads.
        eval_seconds: Wall-clock time of the evaluations after the epoch.

    The diagnostics counts are ``None`` when the run has no memory.
    """

    epoch: int
    loss: float
    memory_term: float
    memory_mean_term: float | None
    memory_mean_weight: float | None
    memory_accuracy: float | None
    rows_classified: int | None
    rows_forgotten: int | None
    rows_recovered: int | None
    rows_skipped: int | None
    train_clean_accuracy: float
    test_clean_accuracy: float
    curve_clean_accuracy: float | None
    curve_pgd_accuracy: float | None
    holdout_pgd_accuracy: float | None
    attack_from_memory: bool
    lr: float
    seconds: float
    cpu_seconds: float
    eval_seconds: float


EPOCH_COLUMNS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(EpochStats))
"""The columns of the per-epoch files: the fields of :class:`EpochStats`, in order."""

RUN_COLUMNS: tuple[str, ...] = ("method", "memory", "seed")
"""The columns ``memloss compare`` puts before :data:`EPOCH_COLUMNS` to name each run."""


def write_epoch_records(
    records: Sequence[Mapping[str, Any]],
    folder: str | Path,
    *,
    columns: Sequence[str] = EPOCH_COLUMNS,
) -> tuple[Path, Path]:
    """Write ``records`` to ``folder/epochs.jsonl`` and ``folder/epochs.csv``, each atomically.

    Every record becomes one JSON line and one CSV row with ``columns`` in order; a missing or
    ``None`` value is ``null`` in JSON and an empty cell in the CSV; keys not in ``columns`` are
    left out.

    Returns:
        The paths of the JSON-lines and CSV files.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({c: record.get(c) for c in columns}) + "\n" for record in records)
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(columns)
    for record in records:
        writer.writerow(["" if record.get(c) is None else record.get(c) for c in columns])
    jsonl, csv_path = folder / JSONL_FILE, folder / CSV_FILE
    _replace(jsonl, lines)
    _replace(csv_path, table.getvalue())
    return jsonl, csv_path


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def forgetting_rate(record: Mapping[str, Any]) -> float | None:
    """``rows_forgotten / rows_classified`` of one epoch, or ``None`` when nothing was classified.

    Example:
        >>> forgetting_rate({"rows_forgotten": 3, "rows_classified": 12}), forgetting_rate({})
        (0.25, None)
    """
    classified = record.get("rows_classified")
    forgotten = record.get("rows_forgotten")
    if not classified or forgotten is None:
        return None
    return forgotten / classified


def _mean_curve(runs: Sequence[Sequence[Mapping[str, Any]]], value: Any) -> list[float]:
    """Per epoch, the mean of ``value(record)`` over the runs that have one (NaN where none)."""
    length = max((len(run) for run in runs), default=0)
    curve = []
    for i in range(length):
        values = [v for run in runs if i < len(run) and (v := value(run[i])) is not None]
        curve.append(sum(values) / len(values) if values else math.nan)
    return curve


def plot_epoch_curves(
    groups: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]],
    path: str | Path,
    *,
    title: str = "",
    styles: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Save a three-panel plot per epoch: forgetting, test PGD-20 accuracy, test clean accuracy.

    Forgetting is the share of the memory rows read that the model now misclassifies though they
    did not fool it when stored (:func:`forgetting_rate`, needs diagnostics); the accuracies are
    those of the curve's test samples. Each line is the mean over the runs of its group (the
    caption says over how many); the legend sits below the panels.

    Args:
        groups: ``{label: [records of one run, ...]}``, e.g. ``{"trades + MemLoss": [seed0,
            seed1]}``.
        path: Where to save the PNG.
        title: Plot title.
        styles: Extra matplotlib line keywords per label (colour, line style).

    Raises:
        ImportError: If matplotlib is not installed.
    """
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    panels: list[tuple[str, str, Any]] = [
        ("forgetting", "forgotten / classified memory rows (%)", forgetting_rate),
        ("test PGD-20 accuracy", "accuracy (%)", lambda r: r.get("curve_pgd_accuracy")),
        ("test clean accuracy", "accuracy (%)", lambda r: r.get("curve_clean_accuracy")),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 4.4))
    longest = max((len(run) for runs in groups.values() for run in runs), default=1)
    for label, runs in groups.items():
        style = dict((styles or {}).get(label, {}))
        epochs = list(range(1, max((len(run) for run in runs), default=0) + 1))
        for ax, (_, _, value) in zip(axes, panels, strict=True):
            curve = _mean_curve(runs, value)
            ax.plot(epochs, [100 * v for v in curve], marker=".", label=label, **style)
    for ax, (name, unit, _) in zip(axes, panels, strict=True):
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(unit)
        ax.set_xlim(0.5, longest + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    counts = " or ".join(str(c) for c in sorted({len(runs) for runs in groups.values()}))
    caption = (
        f"Each line: mean over {counts} run(s) (seeds). Forgetting: memory examples that did not "
        "fool the model when stored and fool it now, over those classified (needs --diagnostics; "
        "none in epoch 1). Accuracies on the first curve-samples test images."
    )
    handles, labels = axes[0].get_legend_handles_labels()
    columns = min(4, max(1, len(labels)))
    rows = math.ceil(len(labels) / columns)
    fig.suptitle(title)
    fig.legend(
        handles,
        labels,
        loc="lower center",
        bbox_to_anchor=(0.5, 0.045),
        ncol=columns,
        fontsize=8,
        frameon=False,
    )
    fig.text(0.5, 0.008, caption, ha="center", va="bottom", fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.1 + 0.045 * rows, 1, 0.95))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # file output only; works without a display
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError(
            'the plot needs matplotlib: pip install "memloss-addon[examples]"'
        ) from err
    return plt
