"""The trade-off plot of a comparison: clean against robust accuracy, base -> MemLoss arrows.

One panel per robust evaluation (PGD-20, CW-20, AutoAttack, those that ran), the error bars named
in the caption, the legend beside the panels. Needs matplotlib
(``pip install "memloss-addon[examples]"``); it draws into a file, no display.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from memloss_addon.experiments.compare_report import ATTACK_LABELS, Summary

__all__ = ["plot_tradeoff"]


def plot_tradeoff(
    summary: Summary,
    path: str | Path,
    *,
    robust: str | Sequence[str],
    title: str = "",
    seeds: int | None = None,
) -> None:
    """Save clean-vs-robust accuracy panels: one colour per method, an arrow base -> MemLoss.

    Args:
        summary: :func:`~.compare_report.summarize`'s output.
        path: Where to save the PNG.
        robust: The attack (or attacks, one panel each) whose accuracy goes on the vertical axis.
        title: Plot title.
        seeds: Seeds behind each point, named in the caption (``None``: not stated).

    Raises:
        ImportError: If matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # file output only; works without a display
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError(
            'the trade-off plot needs matplotlib: pip install "memloss-addon[examples]"'
        ) from err
    attacks = [robust] if isinstance(robust, str) else list(robust)
    width = 4.6 * len(attacks) + 2.2  # panels plus the legend beside them
    fig, axes = plt.subplots(1, len(attacks), figsize=(width, 4.6), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, attack in zip(axes[0], attacks, strict=True):
        _panel(ax, summary, attack, colours)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    spread = (
        f"mean ± std over {seeds} seed{'s' if seeds != 1 else ''}"
        if seeds is not None
        else "mean ± std over the seeds"
    )
    if seeds == 1:
        spread += " (one seed: no spread)"
    fig.suptitle(title or "clean vs robust accuracy")
    fig.text(
        0.01,
        0.01,
        f"Points: {spread}, error bars ± 1 std on both axes. Open: base, filled: + MemLoss; "
        "arrows go from base to + MemLoss.",
        fontsize=7,
        ha="left",
        va="bottom",
    )
    legend_width = 2.0 / fig.get_figwidth()
    fig.tight_layout(rect=(0, 0.05, 1 - legend_width, 0.95))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _panel(ax: Any, summary: Summary, robust: str, colours: Any) -> None:
    for i, (method, entry) in enumerate(summary.items()):
        points = {}
        for variant, marker in (("base", "o"), ("memloss", "^")):
            if variant not in entry or robust not in entry[variant]:
                continue
            (cx, sx), (ry, sy) = entry[variant]["clean"], entry[variant][robust]
            label = f"{method}" + (" + MemLoss" if variant == "memloss" else "")
            ax.errorbar(
                100 * cx,
                100 * ry,
                xerr=100 * sx,
                yerr=100 * sy,
                fmt=marker,
                color=colours(i),
                markerfacecolor="none" if variant == "base" else colours(i),
                capsize=3,
                label=label,
            )
            points[variant] = (100 * cx, 100 * ry)
        if len(points) == 2:
            ax.annotate(
                "",
                xy=points["memloss"],
                xytext=points["base"],
                arrowprops={"arrowstyle": "->", "color": colours(i), "alpha": 0.6},
            )
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel(f"{ATTACK_LABELS.get(robust, robust)} accuracy (%)")
    ax.set_title(ATTACK_LABELS.get(robust, robust))
    ax.grid(alpha=0.3)
