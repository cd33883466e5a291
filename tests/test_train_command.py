"""``memloss train --preset``, ``--dry-run``, a killed run continued by the same command, the
final evaluation, and ``memloss eval --reference-source``.

The end-to-end preset runs are the slow tests of this file (a few seconds each on two cores):
they train a reference preset on a small synthetic CIFAR-shaped set (``fake-cifar``, shrunk
here to 48 training images) for two epochs of three steps, with the width overridden to a tiny
one. They check that a preset runs through the command, not accuracy.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
from torch.utils.data import DataLoader

from memloss_addon.experiments import cli, datasets
from memloss_addon.experiments.cli_parser import build_parser
from memloss_addon.experiments.models import build_model
from memloss_addon.experiments.reference_weights import to_reference_state_dict
from memloss_addon.experiments.train_settings import resolve_train_request
from memloss_addon.experiments.training import TrainingRun


@pytest.fixture
def small_fake_cifar(monkeypatch):
    """fake-cifar with 48 training and 16 test images (the command loads it by name)."""
    monkeypatch.setattr(
        datasets,
        "load_fake_cifar",
        functools.partial(datasets.load_fake_cifar, num_train=48, num_test=16),
    )


TINY = ["--dataset", "fake-cifar", "--epochs", "2", "--batch-size", "16", "--steps", "1"]


def _train(*argv: str) -> int:
    return cli.main(["train", *argv, "--no-progress"])


# -- resolving a preset --------------------------------------------------------------------------


def _request(*argv: str):
    return resolve_train_request(build_parser().parse_args(["train", *argv]))


def test_typed_options_override_the_preset_and_set_in_that_order():
    request = _request(
        "--preset",
        "pgd-at-preact-resnet18-cifar10+memloss",
        "--set",
        "epochs=3",
        "base_width=4",
        "--set",
        "lr=0.5",
        "--lr",
        "0.2",
        "--amp",
        "bf16",
    )
    values = request.values
    assert values["epochs"] == 3 and values["base_width"] == 4  # --set
    assert values["lr"] == 0.2 and values["amp"] == "bf16"  # typed wins over --set
    assert values["pad_mode"] == "reflect" and values["normalization"] == "cifar10"  # the preset
    assert values["memory"] is True and values["holdout"] == 1000
    assert request.dataset == "cifar10"
    config = request.config()
    assert config.model == "preact-resnet18" and config.weight_decay == 5e-4


def test_without_a_preset_todays_defaults_hold():
    values = _request("--method", "trades").values
    assert values == {"memory": True, "method": "trades", "eps": 0.15}
    config = _request("--method", "trades", "--dataset", "fake-cifar").config()
    assert config.memory and config.eps == pytest.approx(8 / 255) and config.epochs == 10
    assert config.augment is False and config.device == "cpu" and config.holdout == 0


def test_a_base_preset_stays_without_memloss_and_no_memory_wins_over_memloss():
    assert _request("--preset", "mart-resnet18-cifar10").values["memory"] is False
    assert (
        _request("--preset", "mart-resnet18-cifar10+memloss", "--no-memory").values["memory"]
        is False
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "nope"], "unknown preset"),
        (["--preset", "mart-resnet18-cifar10", "--widen-factor", "2"], "widen_factor"),
        (["--preset", "hat-resnet18-cifar10", "--method", "trades"], "nesterov"),
        (["--preset", "mart-resnet18-cifar10", "--set", "colour=red"], "unknown setting"),
        (["--method", "trades", "--set", "nesterov=True"], "recipe"),
        (["--method", "trades", "--widen-factor", "2"], "widen_factor"),
        (["--dataset", "digits"], "--method is required"),
    ],
)
def test_bad_requests_are_one_line_errors(tmp_path, capsys, argv, message):
    assert _train(*argv, "--out", str(tmp_path)) == 1
    err = capsys.readouterr().err
    assert err.startswith("memloss: error:") and message in err and "Traceback" not in err


def test_dry_run_prints_each_setting_with_its_source_and_trains_nothing(tmp_path, capsys):
    code = _train(
        "--preset",
        "trades-wrn-34-10-cifar10+memloss",
        "--dry-run",
        "--set",
        "widen_factor=1",
        "--device",
        "cuda",
        "--data-dir",
        str(tmp_path / "no-cifar-here"),
    )
    out = capsys.readouterr().out
    assert code == 0 and not (tmp_path / "no-cifar-here").exists()
    assert "train_trades_cifar10.py:30" in out  # eps 0.031
    assert "widen_factor  = 1" in out and "# override" in out
    assert "device             = 'cuda'" in out and "# typed" in out
    assert "training set on the device: True" in out  # CUDA: device-resident by default
    assert _train("--method", "pgd_at", "--dry-run") == 0
    assert "eps                = 0.15" in capsys.readouterr().out


# -- a preset trained through the command (slow) ---------------------------------------------


@pytest.mark.parametrize(
    ("preset", "tiny"),
    [
        ("trades-wrn-34-10-cifar10+memloss", "widen_factor=1"),
        ("hat-preact-resnet18-cifar10+memloss", "base_width=2"),
    ],
)
def test_slow_preset_trains_end_to_end_on_synthetic_cifar(
    tmp_path, capsys, small_fake_cifar, preset, tiny
):
    pytest.importorskip("torchattacks")
    out = tmp_path / "run"
    argv = [
        "--preset",
        preset,
        *TINY,
        "--set",
        tiny,
        "helper_epochs=1",
        "--holdout",
        "8",
        "--device-data",
        "--final-autoattack",
        "fast",
        "--final-eval-samples",
        "8",
        "--out",
        str(out),
    ]
    assert _train(*argv) == 0
    printed = capsys.readouterr().out
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    config = state["config"]
    assert state["epoch"] == 2 and config["augment"] is True and config["memory"] is True
    assert config["normalization"] == "identity" and state["best"] is not None
    history = state["history"]
    assert history[0]["memory_term"] == 0.0 and history[1]["memory_term"] > 0.0
    final = json.loads((out / "final_eval.json").read_text())
    assert final["weights"] == "best" and list(final["accuracy"]) == ["clean", "pgd", "autoattack"]
    assert final["num_eval"] == 8
    log = (out / "train.log").read_text()
    assert "epoch 2/2:" in log and "img/s" in log and "final (best weights" in log
    assert "img/s" in printed
    # The same command again: the run is finished and evaluated; nothing is redone.
    assert _train(*argv) == 0
    assert "final evaluation done already" in capsys.readouterr().out


def test_slow_a_killed_run_continues_with_the_same_command(tmp_path, capsys, small_fake_cifar):
    argv = [
        "--preset",
        "mart-resnet18-cifar10+memloss",
        *TINY,
        "--set",
        "base_width=2",
        "--no-final-eval",
    ]
    assert _train(*argv, "--out", str(tmp_path / "straight")) == 0
    # Killed after epoch 1: what the command had saved by then.
    request = _request(*argv)
    partial = TrainingRun(request.config(), datasets.load_dataset("fake-cifar"))
    partial.fit(until_epoch=1, checkpoint_path=tmp_path / "killed" / "checkpoint.pt")
    torch.manual_seed(7)
    assert _train(*argv, "--out", str(tmp_path / "killed")) == 0
    assert "continuing the run" in capsys.readouterr().out
    straight, resumed = (
        torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)
        for name in ("straight", "killed")
    )
    assert resumed["epoch"] == 2
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    # Another run into the same folder is refused rather than overwriting it.
    assert _train(*argv, "--epochs", "3", "--out", str(tmp_path / "killed")) == 1
    assert "holds another run" in capsys.readouterr().err


def test_cuda_without_cuda_is_a_one_line_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert _train("--method", "trades", "--device", "cuda", "--out", str(tmp_path)) == 1
    assert capsys.readouterr().err == "memloss: error: --device cuda: CUDA is not available here\n"


def test_final_eval_needs_torchattacks(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None)
    assert _train("--method", "trades", "--final-eval", "--out", str(tmp_path)) == 1
    assert "torchattacks" in capsys.readouterr().err


# -- published checkpoints ------------------------------------------------------------------------


def test_eval_of_a_published_trades_checkpoint(tmp_path, capsys, small_fake_cifar):
    torch.manual_seed(0)
    model = build_model(
        "resnet18", sample_shape=(3, 32, 32), num_classes=10, normalization=None, base_width=2
    )
    path = tmp_path / "model-res-epoch76.pt"
    torch.save(to_reference_state_dict(model), path)  # TRADES saves model.state_dict()
    report = tmp_path / "eval.json"
    argv = ["eval", str(path), "--reference-source", "trades", "--model", "resnet18"]
    common = ["--dataset", "fake-cifar", "--attacks", "clean", "--no-progress"]
    assert cli.main([*argv, "--base-width", "2", *common, "--json", str(report)]) == 0
    document = json.loads(report.read_text())
    assert document["reference_source"] == "trades" and document["eps"] == 0.031
    test = datasets.load_fake_cifar().test
    with torch.no_grad():
        model.eval()
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in DataLoader(test, 8))
    assert document["accuracy"]["clean"] == pytest.approx(correct / len(test))
    capsys.readouterr()
    # A width that does not fit, or a normalization the checkpoint was not trained with.
    assert cli.main([*argv, *common]) == 1
    assert "shape" in capsys.readouterr().err
    assert cli.main([*argv, "--base-width", "2", "--normalization", "cifar10", *common]) == 1
    assert "unnormalized" in capsys.readouterr().err
    assert cli.main(["eval", str(path), "--model", "resnet18"]) == 1
    assert "--reference-source" in capsys.readouterr().err
