"""The ``memloss`` command end to end, in tiny configurations."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader

from memloss_addon.experiments import cli
from memloss_addon.experiments.datasets import load_digits
from memloss_addon.experiments.models import build_model
from memloss_addon.experiments.training import TrainConfig, TrainingRun

pytest.importorskip("sklearn")


def test_version_and_help(capsys):
    assert cli.main(["--version"]) == 0
    assert "memloss" in capsys.readouterr().out
    assert cli.main([]) == 2  # no subcommand: usage, not a traceback


def test_compare_quick_end_to_end(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("torchattacks")
    out = tmp_path / "cmp"
    code = cli.main(
        [
            "compare",
            "--quick",
            "--methods",
            "trades",
            "pgd_at",
            "--epochs",
            "1",
            "--steps",
            "1",
            "--eval-samples",
            "40",
            "--jobs",
            "1",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    document = json.loads((out / "results.json").read_text())
    assert document["complete"] is True
    assert document["torch_version"] == str(torch.__version__)
    assert document["config"]["methods"] == ["trades", "pgd_at"]
    assert document["config"]["epochs"] == 1 and document["config"]["seeds"] == [0]
    assert document["dataset"]["name"] == "digits" and document["dataset"]["num_eval"] == 40
    assert "T" in document["date"]
    runs = document["runs"]
    assert [(r["method"], r["memory"]) for r in runs] == [
        ("trades", False),
        ("trades", True),
        ("pgd_at", False),
        ("pgd_at", True),
    ]
    for run in runs:
        assert list(run["accuracy"]) == ["clean", "pgd", "autoattack"]
        for value in run["accuracy"].values():
            # 40 evaluation images: every accuracy is a multiple of 1/40.
            assert 0.0 <= value <= 1.0 and abs(value * 40 - round(value * 40)) < 1e-9
        assert run["accuracy"]["autoattack"] <= run["accuracy"]["clean"]
    # The summary's difference is MemLoss minus base of the single seed, recomputed here.
    for method in ("trades", "pgd_at"):
        base, mem = (
            next(r for r in runs if r["method"] == method and r["memory"] is m)
            for m in (False, True)
        )
        for name in ("clean", "pgd", "autoattack"):
            mean, std = document["summary"][method]["difference"][name]
            assert mean == pytest.approx(mem["accuracy"][name] - base["accuracy"][name])
            assert std == 0.0
    png = (out / "tradeoff.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert "+MemLoss" in printed and "AutoAttack" in printed and "trades" in printed
    base_clean = 100 * runs[0]["accuracy"]["clean"]
    assert f"{base_clean:.2f} ± 0.00" in printed


def test_train_then_eval_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        cli.main(
            [
                "train",
                "--method",
                "trades",
                "--epochs",
                "1",
                "--steps",
                "1",
                "--model",
                "digits-mlp",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    checkpoint = out / "checkpoint.pt"
    assert checkpoint.is_file()
    report = tmp_path / "eval.json"
    assert (
        cli.main(
            [
                "eval",
                str(checkpoint),
                "--attacks",
                "clean",
                "pgd",
                "--pgd-steps",
                "2",
                "--no-progress",
                "--json",
                str(report),
            ]
        )
        == 0
    )
    accuracy = json.loads(report.read_text())["accuracy"]
    assert list(accuracy) == ["clean", "pgd"]
    # Clean accuracy recomputed independently from the saved weights.
    state = torch.load(checkpoint, weights_only=True)
    model = build_model("digits-mlp", sample_shape=(1, 8, 8), num_classes=10)
    model.load_state_dict(state["model"])
    model.eval()
    test = load_digits().test
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in DataLoader(test, 100))
    assert accuracy["clean"] == pytest.approx(correct / len(test))
    assert "clean" in capsys.readouterr().out


def test_train_resume_matches_an_uninterrupted_run(tmp_path):
    common = [
        "--method",
        "pgd_at",
        "--epochs",
        "2",
        "--steps",
        "1",
        "--model",
        "digits-mlp",
        "--seed",
        "4",
        "--no-progress",
    ]
    assert cli.main(["train", *common, "--out", str(tmp_path / "straight")]) == 0
    # Interrupted after one epoch, the way the command saves it, then resumed by the command.
    config = TrainConfig(
        method="pgd_at", epochs=2, steps=1, model="digits-mlp", seed=4, memory=True, eps=0.15
    )
    partial = TrainingRun(config, load_digits())
    partial.fit(until_epoch=1, checkpoint_path=tmp_path / "resumed" / "checkpoint.pt")
    assert (
        cli.main(
            [
                "train",
                "--resume",
                str(tmp_path / "resumed" / "checkpoint.pt"),
                "--out",
                str(tmp_path / "resumed"),
                "--no-progress",
            ]
        )
        == 0
    )
    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert straight["epoch"] == resumed["epoch"] == 2
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key


def test_missing_cifar_folder_is_a_one_line_error(tmp_path, capsys):
    code = cli.main(
        [
            "train",
            "--dataset",
            "cifar10",
            "--method",
            "trades",
            "--out",
            str(tmp_path / "o"),
            "--data-dir",
            str(tmp_path / "nowhere"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("memloss: error: cifar10 not found in")
    assert "nowhere" in err and "data_batch_1" in err and "Traceback" not in err


def test_train_without_method_says_what_to_do(tmp_path, capsys):
    assert cli.main(["train", "--out", str(tmp_path)]) == 1
    assert "--method is required" in capsys.readouterr().err


def test_eval_of_a_non_checkpoint_is_an_error(tmp_path, capsys):
    bogus = tmp_path / "x.pt"
    torch.save({"weights": torch.zeros(1)}, bogus)
    assert cli.main(["eval", str(bogus)]) == 1
    assert "not a memloss training checkpoint" in capsys.readouterr().err


def test_bad_choice_is_a_usage_error(capsys):
    assert cli.main(["compare", "--methods", "nope", "--out", "x"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_patch_subcommand_is_registered_when_available(capsys):
    pytest.importorskip("memloss_addon.experiments.patching")
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(["patch", "--help"])
    assert info.value.code == 0
    assert "--revert" in capsys.readouterr().out
