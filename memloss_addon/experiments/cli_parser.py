"""The ``memloss`` command's arguments: subcommands, options, their choices and defaults.

Choices come from the option lists (:mod:`memloss_addon.options` and
:mod:`memloss_addon.experiments.names`) and defaults from the fields of
:class:`~memloss_addon.experiments.train_config.TrainConfig` and
:class:`~memloss_addon.experiments.compare_config.CompareConfig` and from
:data:`~memloss_addon.experiments.train_config.METHOD_RECIPES`, so each is written once. None of
the modules read here imports torch, so ``--help`` is quick.

The training options of ``memloss train`` default to ``None``, so that the command can tell
the options typed (which override a ``--preset``) from the others; it fills in the defaults their
help states (:data:`TRAIN_COMMAND_DEFAULTS`, then TrainConfig's). ``memloss compare`` keeps
ordinary defaults.

Example:
    >>> args = build_parser().parse_args(["train", "--method", "mart", "--out", "run"])
    >>> args.command, args.method, args.weighting, args.memory, args.epochs
    ('train', 'mart', None, None, None)
    >>> build_parser().parse_args(["train", "--preset", "x", "--no-memory", "--out", "o"]).memory
    False
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from memloss_addon.experiments.compare_config import QUICK, compare_default
from memloss_addon.experiments.names import (
    AMP_MODES,
    ATTACK_INITS,
    ATTACK_NAMES,
    AUTOATTACK_PRESETS,
    DATASET_NAMES,
    METHOD_NAMES,
    MODEL_NAMES,
    MODEL_STATES,
    NORMALIZATION_NAMES,
    PAD_MODES,
    REFERENCE_SOURCES,
)
from memloss_addon.experiments.train_config import (
    DEFAULT_MILESTONES,
    METHOD_RECIPES,
    TrainConfig,
    lr_schedule_help,
)
from memloss_addon.options import BN_MODES, MODES, STORAGE_DTYPE_NAMES, WEIGHTINGS
from memloss_addon.version import __version__

__all__ = ["DIAGNOSTICS_CURVE_SAMPLES", "TRAIN_COMMAND_DEFAULTS", "build_parser"]

_DATASET_HELP = (
    "digits: scikit-learn's bundled real 8x8 handwritten digits (no download); "
    "fake-cifar: random CIFAR-shaped tensors for speed checks only (accuracies are meaningless); "
    "cifar10, cifar100, svhn: read from --data-dir, never downloaded"
)

DIAGNOSTICS_CURVE_SAMPLES = 1000
"""Test samples of the per-epoch curve when --diagnostics is given without --curve-samples."""

TRAIN_COMMAND_DEFAULTS: dict[str, Any] = {"dataset": "digits", "memory": True}
"""Where ``memloss train`` without a preset differs from TrainConfig's defaults (``eps``
depends on the dataset: see the command)."""


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


def _add_data_options(parser: argparse.ArgumentParser, *, device: str | None = "cpu") -> None:
    parser.add_argument(
        "--data-dir", default="data", help="folder with local CIFAR/SVHN files (default: data)"
    )
    if device is None:
        parser.add_argument(
            "--device",
            default=None,
            help="torch device, e.g. cuda or cuda:1 (default: cpu; a resumed run: the "
            "checkpoint's)",
        )
    else:
        parser.add_argument("--device", default=device, help=f"torch device (default: {device})")
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide progress bars"
    )


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    """The training options, each with a ``None`` default so that the ones typed can override a
    preset; :data:`TRAIN_COMMAND_DEFAULTS` and TrainConfig's defaults fill the rest."""
    parser.add_argument(
        "--dataset", choices=DATASET_NAMES, default=None, help=_DATASET_HELP + " (default: digits)"
    )
    parser.add_argument(
        "--method",
        choices=METHOD_NAMES,
        default=None,
        help="base objective (required unless --preset or --resume)",
    )
    _int(parser, "--epochs", "training epochs")
    _int(parser, "--seed", "seed")
    _int(parser, "--batch-size", "batch size")
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="base (HAT: peak) learning rate; the schedule is described above (default: "
        f"{_train_default('lr'):g})",
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
    _int(parser, "--steps", "attack steps")
    parser.add_argument(
        "--beta",
        type=float,
        default=None,
        help=f"regularizer weight (default: {_method_betas()})",
    )
    _float(parser, "--hat-h", "HAT helper distance h")
    _float(parser, "--hat-gamma", "HAT helper-loss weight")
    _int(parser, "--helper-epochs", "cross-entropy epochs of HAT's helper model")
    parser.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="random crop (padding 4) and flip of every training batch, done on the training "
        "device; no flip on svhn (default: off)",
    )
    parser.add_argument(
        "--pad-mode",
        choices=PAD_MODES,
        default=None,
        help="padding of the crop: zeros (torchvision's RandomCrop) or reflect "
        "(robust_overfitting) (default: zeros)",
    )
    _add_model_options(parser)
    _add_schedule_options(parser)
    _add_attack_start_options(parser, typed_only=True)
    _add_evaluation_options(parser, typed_only=True)
    memory = parser.add_argument_group("MemLoss")
    memory.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="add the MemLoss term (default: on; a preset says)",
    )
    _float(memory, "--beta-prime", "MemLoss weight")
    _int(memory, "--depth", "examples kept per sample")
    memory.add_argument(
        "--weighting",
        choices=WEIGHTINGS,
        default=None,
        help="difficulty: weight 1 - p_y(memory example) (default); none: weight 1",
    )
    memory.add_argument(
        "--memory-dtype",
        choices=STORAGE_DTYPE_NAMES,
        default=None,
        help="storage dtype (default: float32; int8 needs --memory-mode perturbation)",
    )
    memory.add_argument(
        "--memory-mode",
        choices=MODES,
        default=None,
        help="store adversarial examples (default) or perturbations",
    )
    memory.add_argument(
        "--bn-mode",
        choices=BN_MODES,
        default=None,
        help="BatchNorm policy of the memory's forward pass (default: train)",
    )
    memory.add_argument(
        "--memory-device",
        "--mem-device",
        dest="memory_device",
        default=None,
        help="where the memory lives (default: cpu; read to a CUDA device through pinned "
        "staging buffers); cuda keeps it on the GPU",
    )
    memory.add_argument(
        "--memory-aligned",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the memory aligned with --augment's crops and flips (ATTA's padded frame): "
        "perturbations replay on the same image pixels; needs --memory-mode perturbation "
        "(default: off)",
    )
    _add_memory_use_options(memory, typed_only=True)
    _add_speed_options(parser)


def _int(parser: Any, flag: str, what: str) -> None:
    name = flag.removeprefix("--").replace("-", "_")
    default = TRAIN_COMMAND_DEFAULTS.get(name, _train_default(name))
    parser.add_argument(flag, type=int, default=None, help=f"{what} (default: {default})")


def _float(parser: Any, flag: str, what: str) -> None:
    name = flag.removeprefix("--").replace("-", "_")
    parser.add_argument(
        flag, type=float, default=None, help=f"{what} (default: {_train_default(name):g})"
    )


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        choices=MODEL_NAMES,
        default=None,
        help="model (default: digits-mlp for 8x8 images, small-resnet for 32x32); the "
        "paper-scale ones are resnet18, preact-resnet18, wrn-34-10, wrn-28-10 "
        "(`memloss models` lists them)",
    )
    parser.add_argument(
        "--normalization",
        choices=NORMALIZATION_NAMES,
        default=None,
        help="input normalization inside a paper-scale model (default: cifar10; identity for "
        "none, as TRADES, MART and HAT train)",
    )
    parser.add_argument(
        "--base-width",
        type=int,
        default=None,
        metavar="W",
        help="first-stage width of resnet18 / preact-resnet18 (default: 64)",
    )
    parser.add_argument(
        "--widen-factor",
        type=int,
        default=None,
        metavar="K",
        help="width factor of wrn-34-10 / wrn-28-10 (default: 10)",
    )


def _add_speed_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("speed (GPU)")
    group.add_argument(
        "--amp",
        choices=AMP_MODES,
        default=None,
        help="bf16: training forward passes under bfloat16 autocast (the MemLoss term is "
        "computed in float32 regardless; evaluations in float32) (default: off)",
    )
    group.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="model and batches in channels_last memory format (default: off)",
    )
    group.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        default=None,
        metavar="BACKEND",
        help="torch.compile the model for training (backend: inductor unless named; eager "
        "only traces) (default: off)",
    )
    group.add_argument(
        "--device-data",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="hold the training set on --device as one (uint8) tensor and crop/flip batches "
        "there, no DataLoader (default: on for CUDA devices)",
    )


def _add_preset_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("presets and final evaluation")
    group.add_argument(
        "--preset",
        metavar="NAME",
        default=None,
        help="start from a reference setting (`memloss presets` lists them); the options typed "
        "here override it",
    )
    group.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="extend",
        nargs="+",
        default=[],
        help="override preset settings or training fields, e.g. --set widen_factor=1 epochs=2 "
        "(repeatable); typed options win over --set",
    )
    group.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved configuration, each preset setting with the reference line it "
        "copies, and exit without training",
    )
    group.add_argument(
        "--final-eval",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="after training, evaluate the kept weights (the best epoch's with a held-out "
        "split) clean, PGD-20 and AutoAttack on the test set and write final_eval.json "
        "(default: on with --preset, off without)",
    )
    group.add_argument(
        "--final-autoattack",
        choices=AUTOATTACK_PRESETS,
        default="standard",
        help="AutoAttack counts of the final evaluation: standard (the reference's, default) "
        "or fast (smoke tests)",
    )
    group.add_argument(
        "--final-eval-samples",
        type=int,
        default=None,
        metavar="N",
        help="final evaluation on the first N test images (default: all)",
    )


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


def _default(name: str, typed_only: bool) -> Any:
    return None if typed_only else _train_default(name)


def _add_attack_start_options(parser: argparse.ArgumentParser, *, typed_only: bool = False) -> None:
    group = parser.add_argument_group("memory-started attacks")
    group.add_argument(
        "--attack-init",
        choices=ATTACK_INITS,
        default=_default("attack_init", typed_only),
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


def _add_evaluation_options(parser: argparse.ArgumentParser, *, typed_only: bool = False) -> None:
    group = parser.add_argument_group("per-epoch evaluation and diagnostics")
    group.add_argument(
        "--diagnostics",
        action="store_true",
        default=None if typed_only else False,
        help="classify every memory example read with the current model and record forgetting "
        "per epoch (one extra forward pass of the rows, no backward; without MemLoss a memory of "
        "weight 0 keeps the examples), measure the per-epoch test curve (see --curve-samples) and "
        "draw diagnostics.png",
    )
    group.add_argument(
        "--holdout",
        type=int,
        default=_default("holdout", typed_only),
        metavar="N",
        help="hold out N training samples (stratified, always the same ones) and keep the "
        "weights of the epoch with the best PGD-20 accuracy on them (default: 0, none; a preset "
        "says)",
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


def _add_memory_use_options(group: argparse._ArgumentGroup, *, typed_only: bool = False) -> None:
    group.add_argument(
        "--replay-fraction",
        type=float,
        default=_default("replay_fraction", typed_only),
        metavar="F",
        help="replay only the fraction F of each batch's memory rows with the largest last "
        "weight (default: 1, all)",
    )


def _add_reference_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "published checkpoints",
        "Evaluate a checkpoint published by a reference repository instead of one written by "
        "memloss train: its state-dict keys are mapped onto the model named by --model, on the "
        "test set of --dataset.",
    )
    group.add_argument(
        "--reference-source",
        choices=REFERENCE_SOURCES,
        default=None,
        help="the repository that wrote CHECKPOINT: trades, mart, hat or robust_overfitting",
    )
    group.add_argument(
        "--model",
        choices=MODEL_NAMES,
        default=None,
        help="its architecture (resnet18, preact-resnet18, wrn-34-10, wrn-28-10)",
    )
    group.add_argument(
        "--dataset",
        choices=DATASET_NAMES,
        default=None,
        help="its dataset, read from --data-dir (default: cifar10)",
    )
    group.add_argument(
        "--normalization",
        choices=NORMALIZATION_NAMES,
        default=None,
        help="the input normalization it was trained with (default: identity for trades, mart "
        "and hat; the dataset's for robust_overfitting; cifar10-hat for HAT's --normalize true)",
    )
    group.add_argument("--base-width", type=int, default=None, metavar="W", help="ResNet width")
    group.add_argument(
        "--widen-factor", type=int, default=None, metavar="K", help="WideResNet width factor"
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
    _add_preset_options(train)
    train.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (required unless --dry-run); a run killed there continues when the "
        "same command is given again",
    )
    train.add_argument(
        "--resume",
        type=Path,
        default=None,
        help="continue from this checkpoint (its training options replace the ones given; only "
        "--device, --mem-device, --device-data, --amp, --channels-last and --compile may change)",
    )
    _add_data_options(train, device=None)

    ev = sub.add_parser(
        "eval", help="evaluate a checkpoint", description="Evaluate a checkpoint on its test set."
    )
    ev.add_argument(
        "checkpoint",
        type=Path,
        help="checkpoint written by memloss train (or a published one: --reference-source)",
    )
    ev.add_argument(
        "--attacks",
        nargs="+",
        choices=ATTACK_NAMES,
        default=list(ATTACK_NAMES),
        help="evaluations to run (default: all)",
    )
    ev.add_argument(
        "--eps",
        type=float,
        default=None,
        help="L-inf radius (default: the training eps; a published checkpoint: 0.031 for "
        "trades and mart, 8/255 for hat and robust_overfitting)",
    )
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
    _add_reference_options(ev)
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
