"""Reference presets: resolution, citations, the ``memloss models``/``presets`` subcommands, and
a preset trained end to end for a few steps on synthetic CIFAR-shaped data at tiny width."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memloss_addon import MemoryWrapper
from memloss_addon.experiments.gpu_data import DeviceDataset, synthetic_cifar
from memloss_addon.experiments.models import build_model
from memloss_addon.experiments.preset_commands import add_preset_commands, parse_setting
from memloss_addon.experiments.presets import (
    MEMLOSS_SETTINGS,
    PRESETS,
    REFERENCE_REPOSITORIES,
    SETTING_KEYS,
    dry_run_text,
    get_preset,
    list_presets,
    resolve_preset,
    train_config_kwargs,
)
from memloss_addon.experiments.train_config import METHOD_RECIPES, TrainConfig
from memloss_addon.objectives import hat, mart, pgd_at, trades

BASES = [name for name in list_presets() if not name.endswith("+memloss")]
REQUIRED = {
    "trades-wrn-34-10-cifar10",
    "pgd-at-preact-resnet18-cifar10",
    "hat-resnet18-cifar10",
    "hat-preact-resnet18-cifar10",
    "hat-resnet18-svhn",
    "hat-preact-resnet18-svhn",
    "mart-resnet18-cifar10",
}


def test_the_required_presets_exist_each_with_a_memloss_variant():
    assert REQUIRED <= set(BASES)
    assert set(list_presets()) == set(BASES) | {f"{name}+memloss" for name in BASES}


@pytest.mark.parametrize("name", BASES)
def test_a_memloss_variant_adds_the_term_and_changes_nothing_else(name):
    base, variant = resolve_preset(name), resolve_preset(f"{name}+memloss")
    assert base["memory"] is False
    assert {k: variant[k] for k in MEMLOSS_SETTINGS} == {
        "memory": True,
        "beta_prime": 2.0,
        "depth": 1,
    }
    assert {k: v for k, v in variant.items() if k not in MEMLOSS_SETTINGS} == {
        k: v for k, v in base.items() if k not in MEMLOSS_SETTINGS
    }


@pytest.mark.parametrize("name", list_presets())
def test_every_setting_cites_the_reference_line_it_copies(name):
    preset = get_preset(name)
    for key in preset.settings:
        assert key in SETTING_KEYS
        if key in MEMLOSS_SETTINGS:
            continue
        citations = preset.sources[key]
        assert citations, f"{name}: {key} cites nothing"
        for citation in citations:
            assert citation.repo in REFERENCE_REPOSITORIES and citation.line > 0
            assert citation.quote and str(citation).endswith(f":{citation.line}")


def test_the_reference_values():
    trades_wrn = resolve_preset("trades-wrn-34-10-cifar10")
    assert {
        k: trades_wrn[k]
        for k in (
            "model",
            "epochs",
            "batch_size",
            "lr",
            "weight_decay",
            "eps",
            "step_size",
            "steps",
            "beta",
            "normalization",
        )
    } == {
        "model": "wrn-34-10",
        "epochs": 76,
        "batch_size": 128,
        "lr": 0.1,
        "weight_decay": 2e-4,
        "eps": 0.031,
        "step_size": 0.007,
        "steps": 10,
        "beta": 6.0,
        "normalization": "identity",
    }
    assert trades_wrn["milestones"] == (74 / 76,)  # x0.1 from epoch 75 of 76
    pgd = resolve_preset("pgd-at-preact-resnet18-cifar10")
    assert (pgd["epochs"], pgd["lr"], pgd["weight_decay"], pgd["milestones"]) == (
        200,
        0.1,
        5e-4,
        (0.5, 0.75),
    )
    assert (pgd["eps"], pgd["step_size"], pgd["pad_mode"], pgd["normalization"]) == (
        8 / 255,
        2 / 255,
        "reflect",
        "cifar10",
    )
    hat_svhn = resolve_preset("hat-preact-resnet18-svhn")
    assert (
        hat_svhn["lr"],
        hat_svhn["schedule"],
        hat_svhn["nesterov"],
        hat_svhn["beta"],
        hat_svhn["hat_gamma"],
        hat_svhn["hat_h"],
        hat_svhn["augment"],
    ) == (0.21, "onecycle", True, 2.5, 0.5, 2.0, False)
    assert resolve_preset("hat-resnet18-cifar10")["augment"] is True
    mart_r18 = resolve_preset("mart-resnet18-cifar10")
    assert (mart_r18["epochs"], mart_r18["lr"], mart_r18["weight_decay"], mart_r18["beta"]) == (
        120,
        0.01,
        3.5e-3,
        5.0,
    )
    assert [round(f * 120) + 1 for f in mart_r18["milestones"]] == [75, 90, 100]


def test_overrides_and_their_checks():
    settings = resolve_preset("trades-wrn-34-10-cifar10", epochs=2, widen_factor=1)
    assert settings["epochs"] == 2 and settings["widen_factor"] == 1
    assert list(settings) == [k for k in SETTING_KEYS if k in settings]
    with pytest.raises(ValueError, match="unknown setting"):
        resolve_preset("trades-wrn-34-10-cifar10", epoch=2)
    with pytest.raises(ValueError, match="widen_factor"):
        resolve_preset("mart-resnet18-cifar10", widen_factor=1)
    with pytest.raises(ValueError, match="base_width"):
        resolve_preset("trades-wrn-34-10-cifar10", base_width=4)
    with pytest.raises(ValueError, match="unknown preset"):
        resolve_preset("trades-wrn-70-16-cifar10")


@pytest.mark.parametrize("name", list_presets())
def test_train_config_takes_every_setting_it_knows(name):
    kwargs, rest = train_config_kwargs(resolve_preset(name))
    # Only the dataset is the command's; nesterov and the schedule follow from the method.
    assert set(rest) == {"dataset"}
    recipe = METHOD_RECIPES[kwargs["method"]]
    assert recipe.nesterov == get_preset(name).settings["nesterov"]
    config = TrainConfig(**kwargs)
    for key in ("model", "normalization", "augment", "pad_mode", "holdout"):
        assert getattr(config, key) == get_preset(name).settings[key], key
    expected_schedule = get_preset(name).settings["schedule"]
    assert config.resolved_schedule == expected_schedule
    assert config.resolved_weight_decay == get_preset(name).settings["weight_decay"]


def test_dry_run_names_each_source():
    text = dry_run_text("trades-wrn-34-10-cifar10+memloss", epochs=3)
    assert "train_trades_cifar10.py:30" in text  # eps 0.031
    assert "epochs        = 3" in text and "# override" in text
    assert "MemLoss" in text
    assert "x0.1 from epoch 75 of 76" in dry_run_text("trades-wrn-34-10-cifar10")
    assert "(8/255)" in dry_run_text("hat-resnet18-cifar10")


# -- the citations against the reference repositories, where a local mirror is at hand -----------

MIRRORS = Path(os.environ.get("MEMLOSS_REFERENCE_MIRRORS", "/work/.mirror"))


def _git_dir(repo: str) -> Path | None:
    owner_name = REFERENCE_REPOSITORIES[repo][0].replace("/", "+")
    for candidate in (MIRRORS / owner_name / "repo", MIRRORS / owner_name / "repo" / ".git"):
        if (candidate / "HEAD").exists() and (candidate / "objects").exists():
            return candidate
    return None


def _reference_file(repo: str, path: str) -> list[str] | None:
    git_dir = _git_dir(repo)
    if git_dir is None or shutil.which("git") is None:
        return None
    commit = REFERENCE_REPOSITORIES[repo][1]
    done = subprocess.run(
        ["git", f"--git-dir={git_dir}", "show", f"{commit}:{path}"], capture_output=True, text=True
    )
    return done.stdout.splitlines() if done.returncode == 0 else None


def test_each_citation_quotes_its_line_in_the_reference():
    citations = {c for p in PRESETS.values() for cites in p.sources.values() for c in cites}
    checked = 0
    for citation in sorted(citations, key=str):
        lines = _reference_file(citation.repo, citation.path)
        if lines is None:
            continue
        assert citation.quote in lines[citation.line - 1], (str(citation), citation.quote)
        checked += 1
    if not checked:
        pytest.skip(f"no reference mirror under {MIRRORS} (set MEMLOSS_REFERENCE_MIRRORS)")


# -- the subcommands -----------------------------------------------------------------------------


def _run(argv, capsys):
    parser = argparse.ArgumentParser(prog="memloss")
    add_preset_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    status = args.func(args)
    out = capsys.readouterr()
    return status, out.out, out.err


def test_memloss_models_prints_the_counts(capsys):
    status, out, _ = _run(["models"], capsys)
    assert status == 0
    assert "46,160,474" in out and "11,173,962" in out and "sub_block1" in out


def test_memloss_presets_lists_and_dry_runs(capsys):
    status, out, _ = _run(["presets"], capsys)
    assert status == 0 and all(name in out for name in list_presets())
    status, out, _ = _run(
        ["presets", "--dry-run", "hat-resnet18-svhn", "--set", "epochs=2"], capsys
    )
    assert status == 0 and "svhn.py:26" in out
    status, _, err = _run(["presets", "--dry-run", "nope"], capsys)
    assert status == 1 and "unknown preset" in err
    status, _, err = _run(["presets", "--set", "epochs=2"], capsys)
    assert status == 1 and "--dry-run" in err
    assert parse_setting("augment=false") == ("augment", False)


def test_listing_presets_imports_no_torch():
    code = (
        "import sys, argparse\n"
        "from memloss_addon.experiments.preset_commands import add_preset_commands\n"
        "p = argparse.ArgumentParser(); add_preset_commands(p.add_subparsers(dest='c'))\n"
        "a = p.parse_args(['presets', '--dry-run', 'mart-resnet18-cifar10']); a.func(a)\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().endswith("NO-TORCH")


# -- a preset trained end to end ------------------------------------------------------------------

OBJECTIVES = {"trades": trades, "mart": mart, "pgd_at": pgd_at, "hat": hat}
TINY = {
    "resnet18": {"base_width": 4},
    "preact-resnet18": {"base_width": 4},
    "wrn-34-10": {"widen_factor": 1},
    "wrn-28-10": {"widen_factor": 1},
}


@pytest.mark.parametrize(
    "name",
    [
        "trades-wrn-34-10-cifar10+memloss",
        "pgd-at-preact-resnet18-cifar10+memloss",
        "hat-resnet18-svhn+memloss",
        "mart-resnet18-cifar10+memloss",
    ],
)
def test_preset_trains_end_to_end_in_a_local_loop(name):
    """STAND-IN until TrainConfig runs presets: the resolved settings drive a local loop
    (objectives + MemoryWrapper + DeviceDataset) for 2 epochs of 2 steps on synthetic
    CIFAR-shaped data, with tiny widths and 2 attack steps. It checks that the settings fit
    together, not accuracy."""
    model_name = PRESETS[name].settings["model"]
    s = resolve_preset(name, epochs=2, batch_size=8, steps=2, **TINY[model_name])
    torch.manual_seed(0)
    images, labels = synthetic_cifar(16, seed=0)
    data = DeviceDataset(images, labels, padding=4, pad_mode=s["pad_mode"], augment=s["augment"])
    model = build_model(
        s["model"],
        sample_shape=(3, 32, 32),
        num_classes=10,
        normalization=s["normalization"],
        base_width=s.get("base_width"),
        widen_factor=s.get("widen_factor"),
    )
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=s["lr"],
        momentum=s["momentum"],
        weight_decay=s["weight_decay"],
        nesterov=s["nesterov"],
    )
    memory = MemoryWrapper(
        model,
        num_samples=len(data),
        sample_shape=data.sample_shape,
        beta_prime=s["beta_prime"],
        depth=s["depth"],
    )
    attack = {"eps": s["eps"], "step_size": s["step_size"], "steps": s["steps"]}
    if s["method"] in ("trades", "mart", "hat"):
        attack["beta"] = s["beta"]
    if s["method"] == "hat":  # the helper: a standard model (untrained here), frozen
        helper = build_model(
            s["model"],
            sample_shape=(3, 32, 32),
            num_classes=10,
            normalization=s["normalization"],
            base_width=s.get("base_width"),
        )
        attack.update(helper=helper.eval(), h=s["hat_h"], gamma=s["hat_gamma"])
    objective = OBJECTIVES[s["method"]]
    terms = []
    model.train()
    generator = torch.Generator().manual_seed(0)
    for _ in range(s["epochs"]):
        for batch in data.batches(s["batch_size"], generator=generator):
            out = objective(model, batch.x, batch.y, **attack)
            term = memory(batch.idx, batch.x, out.adv, out.logits, batch.y)
            loss = out.loss + term
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            assert torch.isfinite(loss)
            terms.append(float(term.detach()))
    assert terms[:2] == [0.0, 0.0]  # epoch 1: the memory is empty
    assert all(t > 0 for t in terms[2:])  # epoch 2: every sample's previous example replays
    assert memory.stats()["filled_fraction"] == 1.0
