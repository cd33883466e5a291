"""The ``memloss`` command end to end, in tiny configurations."""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from memloss_addon.experiments import attack_scoring, cli, cli_parser, names
from memloss_addon.experiments.datasets import load_digits
from memloss_addon.experiments.evaluate import evaluate
from memloss_addon.experiments.evaluation_settings import EvaluationSettings
from memloss_addon.experiments.models import build_model
from memloss_addon.experiments.train_config import TrainConfig
from memloss_addon.experiments.training import TrainingRun

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
        cli_parser.build_parser().parse_args(["patch", "--help"])
    assert info.value.code == 0
    assert "--revert" in capsys.readouterr().out


# -- per-epoch records, diagnostics, held-out best epoch ---------------------------------------

DOCUMENTED_EPOCH_COLUMNS = [
    "epoch",
    "loss",
    "memory_term",
    "memory_mean_term",
    "memory_mean_weight",
    "memory_accuracy",
    "rows_classified",
    "rows_forgotten",
    "rows_recovered",
    "rows_skipped",
    "train_clean_accuracy",
    "test_clean_accuracy",
    "curve_clean_accuracy",
    "curve_pgd_accuracy",
    "holdout_pgd_accuracy",
    "attack_from_memory",
    "lr",
    "seconds",
    "cpu_seconds",
    "eval_seconds",
]


def test_train_diagnostics_writes_per_epoch_files_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    args = ["train", "--method", "pgd_at", "--epochs", "2", "--steps", "1", "--diagnostics"]
    args += ["--holdout", "100", "--curve-samples", "30", "--attack-init", "memory"]
    assert cli.main([*args, "--model", "digits-mlp", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    # 1337 training samples in batches of 128: 11 steps per epoch, drops after steps 11 and 16.
    assert "schedule: lr 0.05, x0.1 twice in epoch 2 (after steps 11 and 16 of 22)" in printed
    lines = (out / "epochs.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [list(r) for r in records] == [DOCUMENTED_EPOCH_COLUMNS] * 2
    with open(out / "epochs.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == DOCUMENTED_EPOCH_COLUMNS and len(rows) == 3
    history = torch.load(out / "checkpoint.pt", weights_only=True)["history"]
    for record, row, saved in zip(records, rows[1:], history, strict=True):
        assert record["loss"] == saved["loss"] and float(row[1]) == saved["loss"]
    first, second = records
    assert first["rows_classified"] == 0 and first["memory_accuracy"] is None
    assert rows[1][DOCUMENTED_EPOCH_COLUMNS.index("memory_accuracy")] == ""
    assert second["rows_classified"] == 1337  # every training sample's example, read once
    assert second["rows_forgotten"] + second["rows_recovered"] <= 1337
    assert second["attack_from_memory"] is True and first["attack_from_memory"] is False
    for record in records:
        for name in ("curve_clean_accuracy", "curve_pgd_accuracy"):
            assert abs(record[name] * 30 - round(record[name] * 30)) < 1e-9  # 30 test images
        held_out = record["holdout_pgd_accuracy"] * 100  # 100 held-out images
        assert abs(held_out - round(held_out)) < 1e-9
    assert (out / "diagnostics.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    best_epoch = max(range(2), key=lambda i: (records[i]["holdout_pgd_accuracy"], -i)) + 1
    assert f"best epoch by held-out PGD-20: {best_epoch}" in printed

    report = tmp_path / "best.json"
    checkpoint = str(out / "checkpoint.pt")
    args = ["eval", checkpoint, "--weights", "best", "--attacks", "clean", "--no-progress"]
    assert cli.main([*args, "--json", str(report)]) == 0
    assert json.loads(report.read_text())["epoch"] == best_epoch
    assert f"best epoch {best_epoch} of 2" in capsys.readouterr().out


def test_eval_of_best_weights_without_holdout_is_an_error(tmp_path, capsys):
    config = TrainConfig(method="pgd_at", epochs=1, steps=1, model="digits-mlp")
    TrainingRun(config, load_digits()).save(tmp_path / "ckpt.pt")
    assert cli.main(["eval", str(tmp_path / "ckpt.pt"), "--weights", "best"]) == 1
    assert "--holdout" in capsys.readouterr().err


def test_reset_without_memory_started_attacks_is_a_one_line_error(tmp_path, capsys):
    args = ["train", "--method", "pgd_at", "--attack-reset-every", "5", "--out", str(tmp_path)]
    assert cli.main(args) == 1
    assert "attack_init='memory'" in capsys.readouterr().err


# -- the parser: schedule in --help, declared choices, no torch ----------------------------------


def test_train_help_describes_the_learning_rate_schedule(capsys):
    assert cli.main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "x0.1 after 50% and 75% of the steps" in text
    assert "hat: one-cycle" in text and "--milestones" in text


def test_choices_come_from_the_declared_tuples():
    parser = cli_parser.build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))

    def choices(command: str, option: str):
        sub = subcommands.choices[command]
        return tuple(next(a for a in sub._actions if option in a.option_strings).choices)

    for command in ("train", "compare"):
        assert choices(command, "--attack-init") == names.ATTACK_INITS
        assert choices(command, "--dataset") == names.DATASET_NAMES
    assert choices("train", "--method") == names.METHOD_NAMES
    assert choices("compare", "--methods") == names.METHOD_NAMES
    assert choices("train", "--model") == names.MODEL_NAMES
    assert choices("eval", "--weights") == names.MODEL_STATES
    assert choices("eval", "--attacks") == names.ATTACK_NAMES
    assert choices("eval", "--autoattack") == names.AUTOATTACK_PRESETS
    assert choices("train", "--normalization") == names.NORMALIZATION_NAMES
    assert choices("train", "--pad-mode") == names.PAD_MODES
    assert choices("train", "--amp") == names.AMP_MODES
    assert choices("eval", "--reference-source") == names.REFERENCE_SOURCES


def test_the_torch_free_name_lists_match_the_modules_that_use_them():
    from memloss_addon.experiments import architectures, reference_weights

    assert names.REFERENCE_SOURCES == reference_weights.REFERENCE_SOURCES
    assert set(names.NORMALIZATION_NAMES) == set(architectures.NORMALIZATIONS)
    assert names.MODEL_NAMES[-4:] == architectures.ARCHITECTURE_NAMES


_WITHOUT_PACKAGE_INITS = """
import sys, types, pathlib
root = pathlib.Path({root!r})
# Stand-ins for the package __init__ files (which import torch today), so that this checks what
# the command's own modules import.
for name, folder in [("memloss_addon", root), ("memloss_addon.store", root / "store"),
                     ("memloss_addon.integrations", root / "integrations")]:
    module = types.ModuleType(name)
    module.__path__ = [str(folder)]
    sys.modules[name] = module
from memloss_addon.experiments import cli
for argv in (["--help"], ["train", "--help"], ["eval", "--help"], ["compare", "--help"]):
    assert cli.main(argv) == 0
print("torch" in sys.modules)
"""


def test_the_command_modules_import_no_torch_for_help():
    root = Path(cli.__file__).resolve().parents[1]
    script = _WITHOUT_PACKAGE_INITS.format(root=str(root))
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_help_imports_no_torch_when_the_packages_are_lazy():
    # The parser registers `memloss patch`, whose module imports memloss_addon.integrations and
    # memloss_addon.store: their package __init__ files must load their names lazily too.
    probe = "import sys, memloss_addon.experiments.patching; print('torch' in sys.modules)"
    eager = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    if eager.stdout.strip() != "False":
        pytest.skip("a package __init__ on the patch tool's import path imports torch")
    script = (
        "import sys; from memloss_addon.experiments import cli; "
        "assert cli.main(['train', '--help']) == 0; print('torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip().splitlines()[-1] == "False"


# -- eval's progress bar -------------------------------------------------------------------------


class _FakeBar:
    made: list[_FakeBar] = []

    def __init__(self, iterable=None, *, total=None, **kwargs):
        self.total, self.updates, self.descriptions = total, [], []
        _FakeBar.made.append(self)

    def update(self, n=1):
        self.updates.append(n)

    def set_description(self, text, refresh=True):
        self.descriptions.append(text)

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        pass


def test_eval_progress_bar_moves_after_every_attack_of_every_batch(monkeypatch):
    tqdm_auto = pytest.importorskip("tqdm.auto")
    monkeypatch.setattr(tqdm_auto, "tqdm", _FakeBar)
    _FakeBar.made.clear()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    batches = [(torch.rand(5, 1, 2, 2), torch.randint(0, 3, (5,))) for _ in range(3)]
    evaluate(model, batches, eps=0.1, attacks=["clean", "pgd", "cw"], pgd_steps=2, progress=True)
    (bar,) = _FakeBar.made
    assert bar.total == 9 and bar.updates == [1] * 9
    assert bar.descriptions == ["evaluate: clean", "evaluate: pgd", "evaluate: cw"] * 3


def test_autoattack_sub_attacks_each_move_the_bar_even_when_skipped(monkeypatch):
    # Class 0 when the pixels sum above 2, else class 1 (classes 2 and 3 never win).
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 4)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0] * 4, [-1.0] * 4, [0.0] * 4, [0.0] * 4]))
        model[1].bias.copy_(torch.tensor([-2.0, 2.0, -100.0, -100.0]))

    def fool_everything(x, y):  # projected to x - 0.5: the pixels sum to 1.6, class 1
        return torch.zeros_like(x)

    def never(x, y):
        raise AssertionError("no sample left: must not run")

    chain = [("apgd-ce", fool_everything), ("apgd-t", never), ("fab-t", never), ("square", never)]
    monkeypatch.setattr(attack_scoring, "build_autoattack", lambda *a, **k: chain)
    steps = []
    settings = EvaluationSettings(eps=0.5, attacks=["autoattack"])
    scorer = attack_scoring.AttackScorer(model, settings, on_step=lambda *s: steps.append(s))
    scorer.add(torch.full((6, 1, 2, 2), 0.9), torch.zeros(6, dtype=torch.long))
    assert scorer.units_per_batch == 4 and scorer.accuracies() == {"autoattack": 0.0}
    expected = []
    for name in ("apgd-ce", "apgd-t", "fab-t", "square"):
        expected += [(name, False), (name, True)]
    assert steps == expected
