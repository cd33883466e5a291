"""The comparison job: per-epoch records and plot, best epochs, the trade-off plot."""

from __future__ import annotations

import csv
import json

import pytest

from memloss_addon.experiments import compare_plot
from memloss_addon.experiments.compare import run_comparison
from memloss_addon.experiments.compare_config import QUICK, CompareConfig, compare_default
from memloss_addon.experiments.epoch_records import EPOCH_COLUMNS, RUN_COLUMNS
from tests.test_training import _tiny_splits

pytest.importorskip("matplotlib")


def test_compare_with_diagnostics_writes_every_runs_epochs_and_the_plots(tmp_path):
    config = CompareConfig(
        methods=("pgd_at", "trades"),
        seeds=(0,),
        epochs=2,
        steps=1,
        batch_size=32,
        attacks=("clean", "pgd"),
        pgd_steps=2,
        diagnostics=True,
        curve_samples=20,
        holdout=16,
        attack_init="memory",
    )
    report = run_comparison(config, _tiny_splits(), out=tmp_path, jobs=1)
    names = sorted(path.name for path in report.epoch_files)
    assert names == ["diagnostics.png", "epochs.csv", "epochs.jsonl"]
    with open(tmp_path / "epochs.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == list(RUN_COLUMNS + EPOCH_COLUMNS)
    runs = [(r["method"], r["memory"], r["seed"], r["epoch"]) for r in rows]
    assert runs == [
        (method, memory, "0", epoch)
        for method in ("pgd_at", "trades")
        for memory in ("False", "True")
        for epoch in ("1", "2")
    ]
    for row in rows:  # both arms diagnose: the base arm keeps a memory of weight 0
        assert int(row["rows_classified"]) == (0 if row["epoch"] == "1" else 80)
        if row["memory"] == "False":
            assert float(row["memory_term"]) == 0.0
    lines = (tmp_path / "epochs.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2] * 4
    document = json.loads((tmp_path / "results.json").read_text())
    for run in document["runs"]:
        assert run["best_epoch"] in (1, 2)
        assert set(run["best_accuracy"]) == {"clean", "pgd"}
        assert [e["epoch"] for e in run["epochs"]] == [1, 2]
        assert run["train_cpu_seconds"] > 0
    best = document["summary_best"]["pgd_at"]["base"]["pgd"][0]
    run = next(r for r in document["runs"] if r["method"] == "pgd_at" and not r["memory"])
    assert best == run["best_accuracy"]["pgd"]
    assert document["config"]["attack_init"] == "memory"
    assert (tmp_path / "tradeoff.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "diagnostics.png").read_bytes().startswith(b"\x89PNG")


def test_compare_without_diagnostics_writes_no_epoch_files(tmp_path):
    config = CompareConfig(
        methods=("pgd_at",), seeds=(0,), epochs=1, steps=1, attacks=("clean", "pgd"), pgd_steps=1
    )
    report = run_comparison(config, _tiny_splits(), out=tmp_path, jobs=1)
    assert report.epoch_files == () and not (tmp_path / "epochs.csv").exists()
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["summary_best"] == {} and document["runs"][0]["best_epoch"] is None


def test_tradeoff_plot_has_one_panel_per_attack_named_error_bars_and_an_outside_legend(
    tmp_path, monkeypatch
):
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    summary = {
        "trades": {
            "base": {"clean": [0.9, 0.01], "pgd": [0.6, 0.02], "autoattack": [0.5, 0.02]},
            "memloss": {"clean": [0.91, 0.01], "pgd": [0.62, 0.02], "autoattack": [0.52, 0.03]},
        }
    }
    compare_plot.plot_tradeoff(
        summary, tmp_path / "t.png", robust=("pgd", "autoattack"), title="digits", seeds=3
    )
    (figure,) = figures
    assert [ax.get_title() for ax in figure.axes] == ["PGD-20", "AutoAttack"]
    assert all(ax.get_legend() is None for ax in figure.axes)  # no legend over the data
    (legend,) = figure.legends
    assert [t.get_text() for t in legend.get_texts()] == ["trades", "trades + MemLoss"]
    legend_box = legend.get_window_extent(figure.canvas.get_renderer())
    for ax in figure.axes:  # the legend lies outside every panel
        assert not legend_box.overlaps(ax.get_window_extent())
    captions = " ".join(text.get_text() for text in figure.texts)
    assert "mean ± std over 3 seeds" in captions and "error bars" in captions


def test_compare_config_defaults_are_read_without_making_a_config():
    assert compare_default("epochs") == CompareConfig().epochs
    assert CompareConfig.quick() == CompareConfig(**QUICK)
    with pytest.raises(ValueError, match="attack_init='memory'"):
        CompareConfig(attack_reset_every=5)
    assert CompareConfig(milestones=[0.75, 0.9]).milestones == (0.75, 0.9)
