"""The ``memloss`` command's arguments: subcommands, options, their choices and defaults.

Choices come from the option lists (:mod:`memloss_addon.options` and
:mod:`memloss_addon.experiments.names`) and defaults from the fields of
:class:`~memloss_addon.experiments.train_config.TrainConfig` and
:class:`~memloss_addon.experiments.compare_config.CompareConfig` and from
:data:`~memloss_addon.experiments.train_config.METHOD_RECIPES`, so each is written once. None of
the modules read here imports torch, so ``--help`` is quick.

Example:
    >>> args = build_parser().parse_args(["train", "--method", "mart", "--out", "run"])
    >>> args.command, args.method, args.weighting, args.memory, args.attack_init
    ('train', 'mart', 'difficulty', True, 'random')
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from memloss_addon.experiments.compare_config import QUICK, compare_default
from memloss_addon.experiments.names import (
    ATTACK_INITS,
    ATTACK_NAMES,
    AUTOATTACK_PRESETS,
    DATASET_NAMES,
    METHOD_NAMES,
    MODEL_NAMES,
    MODEL_STATES,
)
from memloss_addon.experiments.train_config import (
    DEFAULT_MILESTONES,
    METHOD_RECIPES,
    TrainConfig,
    lr_schedule_help,
)
from memloss_addon.options import BN_MODES, MODES, STORAGE_DTYPE_NAMES, WEIGHTINGS
from memloss_addon.version import __version__

__all__ = ["DIAGNOSTICS_CURVE_SAMPLES", "build_parser"]

_DATASET_HELP = (
    "digits: scikit-learn's bundled real 8x8 handwritten digits (no download); "
    "fake-cifar: random CIFAR-shaped tensors for speed checks only (accuracies are meaningless); "
    "cifar10, cifar100, svhn: read from --data-dir, never downloaded"
)

DIAGNOSTICS_CURVE_SAMPLES = 1000
"""Test samples of the per-epoch curve when --diagnostics is given without --curve-samples."""


def _train_default(name: str) -> Any:
    """The default of a TrainConfig field (read from the class: no config is made)."""
    for field in dataclasses.fields(TrainConfig):
        if field.name == name:
            return field.default
    raise KeyError(name)


def _method_betas() -> str:
    return ", ".join(
        f"{method} {recipe.beta:g}"
        for method, recipe in METHOD_RECIPES.items()
        if recipe.beta is not None
    )


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", default="data", help="folder with local CIFAR/SVHN files (default: data)"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide progress bars"
    )


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=DATASET_NAMES, default="digits", help=_DATASET_HELP)
    parser.add_argument(
        "--method", choices=METHOD_NAMES, help="base objective (required unless --resume)"
    )
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default: 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size (default: 128)")
    parser.add_argument(
        "--lr",
        type=float,
        default=_train_default("lr"),
        help="base (HAT: peak) learning rate; the schedule is described above (default: 0.05)",
    )
    parser.add_argument(
        "--weight-decay", type=float, default=None, help="SGD weight decay (default: the method's)"
    )
    parser.add_argument(
        "--eps",
        type=float,
        default=None,
        help="L-inf radius in [0,1] pixel units (default: 0.15 on digits, 8/255 otherwise)",
    )
    parser.add_argument(
        "--step-size",
        type=float,
        default=None,
        help="attack step (default: eps/4; 1.25*eps for single_step)",
    )
    parser.add_argument("--steps", type=int, default=10, help="attack steps (default: 10)")
    parser.add_argument(
        "--beta",
        type=float,
        default=None,
        help=f"regularizer weight (default: {_method_betas()})",
    )
    parser.add_argument(
        "--hat-h", type=float, default=2.0, help="HAT helper distance h (default: 2)"
    )
    parser.add_argument(
        "--hat-gamma", type=float, default=0.5, help="HAT helper-loss weight (default: 0.5)"
    )
    parser.add_argument(
        "--helper-epochs",
        type=int,
        default=5,
        help="cross-entropy epochs of HAT's helper model (default: 5)",
    )
    parser.add_argument(
        "--model",
        choices=MODEL_NAMES,
        default=None,
        help="model (default: digits-mlp for 8x8 images, small-resnet for 32x32)",
    )
    parser.add_argument(
        "--augment", action="store_true", help="random crop/flip on CIFAR/SVHN training images"
    )
    _add_schedule_options(parser)
    _add_attack_start_options(parser)
    _add_evaluation_options(parser)
    memory = parser.add_argument_group("MemLoss")
    memory.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add the MemLoss term (default: on)",
    )
    memory.add_argument("--beta-prime", type=float, default=2.0, help="MemLoss weight (default: 2)")
    memory.add_argument(
        "--depth", type=int, default=1, help="examples kept per sample (default: 1)"
    )
    memory.add_argument(
        "--weighting",
        choices=WEIGHTINGS,
        default="difficulty",
        help="difficulty: weight 1 - p_y(memory example) (default); none: weight 1",
    )
    memory.add_argument(
        "--memory-dtype",
        choices=STORAGE_DTYPE_NAMES,
        default="float32",
        help="storage dtype (int8 needs --memory-mode perturbation)",
    )
    memory.add_argument(
        "--memory-mode",
        choices=MODES,
        default="example",
        help="store adversarial examples (default) or perturbations",
    )
    memory.add_argument(
        "--bn-mode",
        choices=BN_MODES,
        default="train",
        help="BatchNorm policy of the memory's forward pass (default: train)",
    )
    memory.add_argument(
        "--memory-device", default="cpu", help="where the memory lives (default: cpu)"
    )
    _add_memory_use_options(memory)


def _fractions(values: tuple[float, ...]) -> str:
    return " ".join(f"{v:g}" for v in values)


def _add_schedule_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--milestones",
        type=float,
        nargs="+",
        default=_train_default("milestones"),
        metavar="F",
        help="fractions of the steps after which the learning rate drops x0.1, e.g. 0.75 0.9 "
        f"(default: {_fractions(DEFAULT_MILESTONES)}, HAT one-cycle); given, every method, HAT "
        "included, uses this piecewise schedule",
    )


def _add_attack_start_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("memory-started attacks")
    group.add_argument(
        "--attack-init",
        choices=ATTACK_INITS,
        default=_train_default("attack_init"),
        help="random: each attack starts as its method does (default); memory: from the "
        "sample's newest memory example (ATTA-style: few --steps accumulate across epochs; "
        "samples without one start at a uniform random point of the eps-ball). Works with "
        "--no-memory (the memory then only starts the attacks)",
    )
    group.add_argument(
        "--attack-reset-every",
        type=int,
        default=_train_default("attack_reset_every"),
        metavar="E",
        help="with --attack-init memory: start as usual in epochs 1, 1+E, 1+2E, ... "
        "(ATTA resets every 10; default: only epoch 1)",
    )


def _add_evaluation_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("per-epoch evaluation and diagnostics")
    group.add_argument(
        "--diagnostics",
        action="store_true",
        help="classify every memory example read with the current model and record forgetting "
        "per epoch (one extra forward pass of the rows, no backward; without MemLoss a memory of "
        "weight 0 keeps the examples), measure the per-epoch test curve (see --curve-samples) and "
        "draw diagnostics.png",
    )
    group.add_argument(
        "--holdout",
        type=int,
        default=_train_default("holdout"),
        metavar="N",
        help="hold out N training samples (stratified, always the same ones) and keep the "
        "weights of the epoch with the best PGD-20 accuracy on them (default: 0, none)",
    )
    group.add_argument(
        "--curve-samples",
        type=int,
        default=_train_default("curve_samples"),
        metavar="N",
        help="after every epoch, clean and PGD-20 accuracy on the first N test samples, the "
        f"robust-overfitting curve (default: none; {DIAGNOSTICS_CURVE_SAMPLES} with "
        "--diagnostics)",
    )


def _add_memory_use_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--replay-fraction",
        type=float,
        default=_train_default("replay_fraction"),
        metavar="F",
        help="replay only the fraction F of each batch's memory rows with the largest last "
        "weight (default: 1, all)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``memloss`` argument parser with all subcommands."""
    parser = argparse.ArgumentParser(
        prog="memloss",
        description="Adversarial training with and without MemLoss: train, eval, compare.",
    )
    parser.add_argument("--version", action="version", version=f"memloss {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="train one model",
        description="Train one model; checkpoint every epoch and write the per-epoch records "
        f"(epochs.jsonl, epochs.csv) to --out. {lr_schedule_help()}",
    )
    _add_train_options(train)
    train.add_argument("--out", required=True, type=Path, help="output folder")
    train.add_argument(
        "--resume",
        type=Path,
        default=None,
        help="continue from this checkpoint (its training options replace the ones given)",
    )
    _add_data_options(train)

    ev = sub.add_parser(
        "eval", help="evaluate a checkpoint", description="Evaluate a checkpoint on its test set."
    )
    ev.add_argument("checkpoint", type=Path, help="checkpoint written by memloss train")
    ev.add_argument(
        "--attacks",
        nargs="+",
        choices=ATTACK_NAMES,
        default=list(ATTACK_NAMES),
        help="evaluations to run (default: all)",
    )
    ev.add_argument("--eps", type=float, default=None, help="L-inf radius (default: training eps)")
    ev.add_argument("--pgd-steps", type=int, default=20, help="PGD/CW steps (default: 20)")
    ev.add_argument(
        "--autoattack",
        choices=AUTOATTACK_PRESETS,
        default="standard",
        help="standard: reference iteration counts; fast: smoke test only",
    )
    ev.add_argument("--eval-samples", type=int, default=None, help="first N test images only")
    ev.add_argument(
        "--weights",
        choices=MODEL_STATES,
        default=MODEL_STATES[0],
        help="last: the last epoch's weights (default); best: the best epoch's by held-out "
        "PGD-20 (runs trained with --holdout)",
    )
    ev.add_argument("--json", type=Path, default=None, help="also write the accuracies here")
    _add_data_options(ev)

    cmp = sub.add_parser(
        "compare",
        help="every method with and without MemLoss over seeds",
        description=(
            "Train each base method with and without MemLoss over several seeds, evaluate each, "
            "print a table, and write results.json and tradeoff.png to --out (with --diagnostics "
            "also the per-epoch records epochs.jsonl, epochs.csv and diagnostics.png). The "
            "defaults took about 12 minutes on a 2-core CPU machine on digits, most of it "
            "AutoAttack; --quick is a smoke test. " + lr_schedule_help()
        ),
    )
    cmp.add_argument("--dataset", choices=DATASET_NAMES, default="digits", help=_DATASET_HELP)
    cmp.add_argument("--methods", nargs="+", choices=METHOD_NAMES, default=list(METHOD_NAMES))
    cmp.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"epochs per run (default: {compare_default('epochs')})",
    )
    cmp.add_argument(
        "--seeds",
        type=int,
        default=None,
        help=f"number of seeds (default: {len(compare_default('seeds'))})",
    )
    cmp.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed, +1, ...")
    cmp.add_argument(
        "--eps",
        type=float,
        default=None,
        help="L-inf radius (default: 0.15 on digits, 8/255 otherwise)",
    )
    cmp.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"training attack steps (default: {compare_default('steps')})",
    )
    cmp.add_argument("--lr", type=float, default=0.05, help="base learning rate (default: 0.05)")
    cmp.add_argument("--beta-prime", type=float, default=2.0, help="MemLoss weight (default: 2)")
    cmp.add_argument(
        "--attacks",
        nargs="+",
        choices=ATTACK_NAMES,
        default=None,
        help=f"evaluations (default: {' '.join(compare_default('attacks'))})",
    )
    cmp.add_argument("--autoattack", choices=AUTOATTACK_PRESETS, default=None)
    cmp.add_argument("--eval-samples", type=int, default=None, help="first N test images only")
    cmp.add_argument(
        "--quick",
        action="store_true",
        help=f"tiny smoke-test configuration ({QUICK['epochs']} epochs, {len(QUICK['seeds'])} "
        f"seed, {QUICK['steps']} attack steps, {QUICK['autoattack']} AutoAttack, "
        f"{QUICK['eval_samples']} test images): checks the pipeline, numbers mean little",
    )
    cmp.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="runs in parallel, one process each (default: 2, or 1 on a one-core machine)",
    )
    _add_schedule_options(cmp)
    _add_attack_start_options(cmp)
    _add_evaluation_options(cmp)
    _add_memory_use_options(cmp.add_argument_group("MemLoss"))
    cmp.add_argument("--out", required=True, type=Path, help="output folder")
    _add_data_options(cmp)

    from memloss_addon.experiments.preset_commands import add_preset_commands

    add_preset_commands(sub)  # models and presets; handlers stored as ``func``

    try:  # the patch tool ships separately from the training code; register it when present
        from memloss_addon.experiments.patching import add_patch_subcommand
    except ModuleNotFoundError as err:
        if err.name != "memloss_addon.experiments.patching":
            raise
    else:
        add_patch_subcommand(sub)  # its handler is stored as ``func``
    return parser
