"""The ``memloss`` command: train, evaluate and compare adversarial training with MemLoss.

Subcommands:

- ``memloss train``: one run of any base objective, with or without the memory; checkpoints after
  every epoch and resumes from a checkpoint.
- ``memloss eval``: a checkpoint against clean, PGD, CW and AutoAttack evaluations.
- ``memloss compare``: every base method with and without MemLoss over several seeds, with a table,
  results.json and a clean-vs-robust plot.
- ``memloss patch``: apply the integration patches to upstream repositories (when installed).

Example:
    >>> main(["--version"])  # doctest: +ELLIPSIS
    memloss ...
    0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from memloss_addon.version import __version__

__all__ = ["main", "build_parser"]

EXAMPLES_HINT = 'pip install "memloss-addon[examples]"'
METHODS = ("pgd_at", "trades", "mart", "hat", "squeeze", "single_step")
DATASETS = ("digits", "fake-cifar", "cifar10", "cifar100", "svhn")
ATTACKS = ("clean", "pgd", "cw", "autoattack")
DATASET_HELP = (
    "digits: scikit-learn's bundled real 8x8 handwritten digits (no download); "
    "fake-cifar: random CIFAR-shaped tensors for speed checks only (accuracies are meaningless); "
    "cifar10, cifar100, svhn: read from --data-dir, never downloaded"
)


class CommandError(Exception):
    """An error the command reports in one line, with what to do about it."""


# -- output helpers ------------------------------------------------------------------------------


def _say(message: str) -> None:
    try:
        from tqdm import tqdm
    except ImportError:
        print(message, flush=True)
        return
    tqdm.write(message)  # keeps open progress bars intact


def _batch_bar(enabled: bool, desc: str) -> Callable[[Iterable], Iterable] | None:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are optional
        return None

    def wrap(batches: Iterable) -> Iterable:
        total = len(batches) if hasattr(batches, "__len__") else None
        return tqdm(batches, total=total, desc=desc, leave=False, unit="batch")

    return wrap


def _runs_bar(enabled: bool, total: int) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are optional
        return None
    return tqdm(total=total, desc="runs", unit="run")


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


# -- parser --------------------------------------------------------------------------------------


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", default="data", help="folder with local CIFAR/SVHN files (default: data)"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide progress bars"
    )


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=DATASETS, default="digits", help=DATASET_HELP)
    parser.add_argument(
        "--method", choices=METHODS, help="base objective (required unless --resume)"
    )
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default: 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size (default: 128)")
    parser.add_argument(
        "--lr", type=float, default=0.05, help="base/peak learning rate (default: 0.05)"
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
        help="regularizer weight (default: trades 6, mart 5, hat 2.5, squeeze 6, single_step 1)",
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
        choices=("digits-mlp", "digits-cnn", "small-resnet"),
        default=None,
        help="model (default: digits-mlp for 8x8 images, small-resnet for 32x32)",
    )
    parser.add_argument(
        "--augment", action="store_true", help="random crop/flip on CIFAR/SVHN training images"
    )
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
        choices=("difficulty", "none"),
        default="difficulty",
        help="difficulty: weight 1 - p_y(memory example) (default); none: weight 1",
    )
    memory.add_argument(
        "--memory-dtype",
        choices=("float32", "float16", "bfloat16", "uint8", "int8"),
        default="float32",
        help="storage dtype (int8 needs --memory-mode perturbation)",
    )
    memory.add_argument(
        "--memory-mode",
        choices=("example", "perturbation"),
        default="example",
        help="store adversarial examples (default) or perturbations",
    )
    memory.add_argument(
        "--bn-mode",
        choices=("train", "frozen", "eval"),
        default="train",
        help="BatchNorm policy of the memory's forward pass (default: train)",
    )
    memory.add_argument(
        "--memory-device", default="cpu", help="where the memory lives (default: cpu)"
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
        "train", help="train one model", description="Train one model; checkpoint every epoch."
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
    train.set_defaults(handler=_cmd_train)

    ev = sub.add_parser(
        "eval", help="evaluate a checkpoint", description="Evaluate a checkpoint on its test set."
    )
    ev.add_argument("checkpoint", type=Path, help="checkpoint written by memloss train")
    ev.add_argument(
        "--attacks",
        nargs="+",
        choices=ATTACKS,
        default=["clean", "pgd", "cw", "autoattack"],
        help="evaluations to run (default: all)",
    )
    ev.add_argument("--eps", type=float, default=None, help="L-inf radius (default: training eps)")
    ev.add_argument("--pgd-steps", type=int, default=20, help="PGD/CW steps (default: 20)")
    ev.add_argument(
        "--autoattack",
        choices=("standard", "fast"),
        default="standard",
        help="standard: reference iteration counts; fast: smoke test only",
    )
    ev.add_argument("--eval-samples", type=int, default=None, help="first N test images only")
    ev.add_argument("--json", type=Path, default=None, help="also write the accuracies here")
    _add_data_options(ev)
    ev.set_defaults(handler=_cmd_eval)

    cmp = sub.add_parser(
        "compare",
        help="every method with and without MemLoss over seeds",
        description=(
            "Train each base method with and without MemLoss over several seeds, evaluate each, "
            "print a table, and write results.json and tradeoff.png to --out. The defaults take "
            "about 10 minutes on 2 CPU cores on digits (most of it AutoAttack)."
        ),
    )
    cmp.add_argument("--dataset", choices=DATASETS, default="digits", help=DATASET_HELP)
    cmp.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    cmp.add_argument("--epochs", type=int, default=None, help="epochs per run (default: 15)")
    cmp.add_argument("--seeds", type=int, default=None, help="number of seeds (default: 3)")
    cmp.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed, +1, ...")
    cmp.add_argument(
        "--eps",
        type=float,
        default=None,
        help="L-inf radius (default: 0.15 on digits, 8/255 otherwise)",
    )
    cmp.add_argument("--steps", type=int, default=None, help="training attack steps (default: 10)")
    cmp.add_argument("--lr", type=float, default=0.05, help="base learning rate (default: 0.05)")
    cmp.add_argument("--beta-prime", type=float, default=2.0, help="MemLoss weight (default: 2)")
    cmp.add_argument(
        "--attacks",
        nargs="+",
        choices=ATTACKS,
        default=None,
        help="evaluations (default: clean pgd autoattack)",
    )
    cmp.add_argument("--autoattack", choices=("standard", "fast"), default=None)
    cmp.add_argument("--eval-samples", type=int, default=None, help="first N test images only")
    cmp.add_argument(
        "--quick",
        action="store_true",
        help="tiny smoke-test configuration (2 epochs, 1 seed, 3 attack steps, fast AutoAttack, "
        "100 test images): checks the pipeline, numbers mean little",
    )
    cmp.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="runs in parallel, one process each (default: 2, or 1 on a one-core machine)",
    )
    cmp.add_argument("--out", required=True, type=Path, help="output folder")
    _add_data_options(cmp)
    cmp.set_defaults(handler=_cmd_compare)

    try:  # the patch tool ships separately from the training code; register it when present
        from memloss_addon.experiments.patching import add_patch_subcommand
    except ModuleNotFoundError as err:
        if err.name != "memloss_addon.experiments.patching":
            raise
    else:
        add_patch_subcommand(sub)  # its handler is stored as ``func``
    return parser


# -- shared steps --------------------------------------------------------------------------------


def _load_splits(name: str, *, data_dir: str, split_seed: int = 0, augment: bool = False):
    try:
        from memloss_addon.experiments.datasets import load_dataset
    except ImportError as err:
        raise CommandError(f"{err}. Install the extras: {EXAMPLES_HINT}") from err
    try:
        splits = load_dataset(name, data_dir=data_dir, split_seed=split_seed, augment=augment)
    except ImportError as err:
        raise CommandError(str(err)) from err
    except FileNotFoundError as err:
        raise CommandError(str(err)) from err
    if splits.synthetic:
        _say(f"note: {name} is random data for speed checks only; its accuracies are meaningless")
    return splits


def _default_eps(dataset: str) -> float:
    # 0.15 on digits leaves robust accuracy near 65%, where methods can differ; 8/255 is CIFAR's.
    return 0.15 if dataset == "digits" else 8 / 255


def _describe(config: Any) -> str:
    memory = (
        f"MemLoss on (beta'={config.beta_prime:g}, depth={config.depth}, {config.weighting}, "
        f"{config.memory_dtype}, {config.memory_mode}, bn={config.bn_mode})"
        if config.memory
        else "MemLoss off"
    )
    return (
        f"{config.method}, eps={config.eps:g}, {config.resolved_steps} step(s) of "
        f"{config.resolved_step_size:g}, {config.epochs} epochs, lr={config.lr:g}, "
        f"seed={config.seed}; {memory}"
    )


# -- train ---------------------------------------------------------------------------------------


def _cmd_train(args: argparse.Namespace) -> int:
    from memloss_addon.experiments.training import TrainConfig, TrainingRun, load_checkpoint

    if args.resume is not None:
        state = _read_checkpoint(args.resume, load_checkpoint)
        info = state["dataset"]
        splits = _load_splits(
            info["name"],
            data_dir=args.data_dir,
            split_seed=info["split_seed"],
            augment=info["augment"],
        )
        try:
            run = TrainingRun.resume(args.resume, splits, device=args.device)
        except ValueError as err:
            raise CommandError(f"cannot resume {args.resume}: {err}") from err
        _say(
            f"resuming {args.resume} after epoch {run.epoch}/{run.config.epochs} "
            f"(training options come from the checkpoint)"
        )
    else:
        if args.method is None:
            raise CommandError("--method is required (or pass --resume CHECKPOINT)")
        splits = _load_splits(args.dataset, data_dir=args.data_dir, augment=args.augment)
        try:
            config = TrainConfig(
                method=args.method,
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=args.lr,
                weight_decay=args.weight_decay,
                eps=args.eps if args.eps is not None else _default_eps(args.dataset),
                step_size=args.step_size,
                steps=args.steps,
                beta=args.beta,
                hat_h=args.hat_h,
                hat_gamma=args.hat_gamma,
                helper_epochs=args.helper_epochs,
                memory=args.memory,
                beta_prime=args.beta_prime,
                depth=args.depth,
                weighting=args.weighting,
                memory_dtype=args.memory_dtype,
                memory_mode=args.memory_mode,
                bn_mode=args.bn_mode,
                memory_device=args.memory_device,
                device=args.device,
                seed=args.seed,
                model=args.model,
            )
            run = TrainingRun(config, splits)
        except (TypeError, ValueError) as err:
            raise CommandError(str(err)) from err
    checkpoint = Path(args.out) / "checkpoint.pt"
    _say(
        f"training on {splits.name} ({len(splits.train)} train / {len(splits.test)} test): "
        f"{_describe(run.config)}"
    )
    if run.config.method == "hat" and not run.helper_trained:
        _say(f"training HAT's helper: {run.config.helper_epochs} epochs of cross-entropy")

    def report(stats: Any) -> None:
        _say(
            f"epoch {stats.epoch}/{run.config.epochs}: loss {stats.loss:.4f}, "
            f"memory term {stats.memory_term:.4f}, train clean {_pct(stats.train_clean_accuracy)}, "
            f"test clean {_pct(stats.test_clean_accuracy)}, lr {stats.lr:.3g}, "
            f"{stats.seconds:.1f} s"
        )

    try:
        ran = run.fit(
            checkpoint_path=checkpoint,
            wrap=_batch_bar(args.progress, "train"),
            on_epoch_end=report,
        )
    except FloatingPointError as err:
        raise CommandError(str(err)) from err
    if not ran:  # resumed from a finished run: still leave a checkpoint in --out
        run.save(checkpoint)
    _say(f"saved {checkpoint}; evaluate it with: memloss eval {checkpoint}")
    return 0


def _read_checkpoint(path: Path, loader: Callable[[Path], dict]) -> dict:
    try:
        return loader(path)
    except (FileNotFoundError, ValueError) as err:
        raise CommandError(str(err)) from err


# -- eval ----------------------------------------------------------------------------------------


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch
    from torch.utils.data import DataLoader, Subset

    from memloss_addon.experiments.models import build_model
    from memloss_addon.experiments.training import load_checkpoint

    state = _read_checkpoint(args.checkpoint, load_checkpoint)
    info = state["dataset"]
    splits = _load_splits(info["name"], data_dir=args.data_dir, split_seed=info["split_seed"])
    model = build_model(
        state["model_name"],
        sample_shape=tuple(info["sample_shape"]),
        num_classes=info["num_classes"],
    )
    model.load_state_dict(state["model"])
    model.to(torch.device(args.device))
    eps = args.eps if args.eps is not None else float(state["config"]["eps"])
    test = splits.test
    if args.eval_samples is not None:
        if args.eval_samples < 1:
            raise CommandError(f"--eval-samples must be positive, got {args.eval_samples}")
        test = Subset(test, range(min(args.eval_samples, len(test))))
    accuracy = _evaluate(
        model,
        DataLoader(test, batch_size=512),
        eps=eps,
        attacks=args.attacks,
        pgd_steps=args.pgd_steps,
        autoattack=args.autoattack,
        progress=args.progress,
    )
    _say(
        f"{args.checkpoint} (epoch {state['epoch']}, {state['config']['method']}, "
        f"MemLoss {'on' if state['config']['memory'] else 'off'}), eps={eps:g}, "
        f"{len(test)} test images:"
    )
    for name, value in accuracy.items():
        _say(f"  {name:<11} {_pct(value)}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "checkpoint": str(args.checkpoint),
            "eps": eps,
            "num_eval": len(test),
            "pgd_steps": args.pgd_steps,
            "autoattack": args.autoattack,
            "accuracy": accuracy,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return 0


def _evaluate(
    model: Any,
    loader: Any,
    *,
    eps: float,
    attacks: Sequence[str],
    pgd_steps: int,
    autoattack: str,
    progress: bool,
) -> dict[str, float]:
    from memloss_addon.experiments.attacks import AutoAttackConfig
    from memloss_addon.experiments.evaluate import evaluate

    config = AutoAttackConfig.fast() if autoattack == "fast" else AutoAttackConfig()
    try:
        return evaluate(
            model,
            loader,
            eps=eps,
            attacks=list(dict.fromkeys(attacks)),
            pgd_steps=pgd_steps,
            autoattack=config,
            progress=progress,
        )
    except ImportError as err:
        raise CommandError(
            f'{err}. AutoAttack needs torchattacks: pip install "memloss-addon[attacks]"'
        ) from err
    except ValueError as err:
        raise CommandError(str(err)) from err


# -- compare -------------------------------------------------------------------------------------


def _compare_config(args: argparse.Namespace) -> Any:
    from memloss_addon.experiments.compare import CompareConfig

    quick = args.quick
    seeds = args.seeds if args.seeds is not None else (1 if quick else 3)
    if seeds < 1:
        raise CommandError(f"--seeds must be at least 1, got {seeds}")
    try:
        return CompareConfig(
            methods=tuple(dict.fromkeys(args.methods)),
            seeds=tuple(range(args.first_seed, args.first_seed + seeds)),
            epochs=args.epochs if args.epochs is not None else (2 if quick else 15),
            eps=args.eps if args.eps is not None else _default_eps(args.dataset),
            steps=args.steps if args.steps is not None else (3 if quick else 10),
            lr=args.lr,
            beta_prime=args.beta_prime,
            helper_epochs=1 if quick else 5,
            attacks=tuple(
                dict.fromkeys(
                    args.attacks if args.attacks is not None else ("clean", "pgd", "autoattack")
                )
            ),
            pgd_steps=5 if quick else 20,
            autoattack=args.autoattack or ("fast" if quick else "standard"),
            eval_samples=args.eval_samples
            if args.eval_samples is not None
            else (100 if quick else None),
            device=args.device,
        )
    except ValueError as err:
        raise CommandError(str(err)) from err


def _cmd_compare(args: argparse.Namespace) -> int:
    from memloss_addon.experiments.compare import (
        compare,
        format_table,
        plot_tradeoff,
        summarize,
        write_results,
    )

    config = _compare_config(args)
    splits = _load_splits(args.dataset, data_dir=args.data_dir)
    if "autoattack" in config.attacks:
        try:
            from memloss_addon.experiments.attacks import import_torchattacks

            import_torchattacks()
        except ImportError as err:
            raise CommandError(
                f'{err}. Install it with pip install "memloss-addon[attacks]", or leave '
                f"autoattack out of --attacks"
            ) from err
    jobs = args.jobs if args.jobs is not None else min(2, os.cpu_count() or 1)
    if jobs < 1:
        raise CommandError(f"--jobs must be at least 1, got {jobs}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    runs = len(config.seeds) * len(config.methods) * 2
    _say(
        f"compare on {splits.name}: {len(config.methods)} methods x {len(config.seeds)} seed(s) x "
        f"(base, +MemLoss) = {runs} runs; {config.epochs} epochs, eps={config.eps:g}, "
        f"{config.steps} attack steps, evaluation: {', '.join(config.attacks)}"
        + (f" (AutoAttack {config.autoattack})" if "autoattack" in config.attacks else "")
        + f"; {jobs} parallel job(s)"
    )
    start = time.perf_counter()
    done: list[Any] = []
    bar = _runs_bar(args.progress, runs)

    def on_result(result: Any, number: int, total: int) -> None:
        done.append(result)
        if bar is not None:
            bar.update(1)
        accs = ", ".join(f"{n} {_pct(v)}" for n, v in result.accuracy.items())
        _say(
            f"[{number}/{total}] {result.method:<11} {'+MemLoss' if result.memory else 'base    '} "
            f"seed {result.seed}: {accs} (train {result.train_seconds:.0f} s, "
            f"eval {result.eval_seconds:.0f} s)"
        )
        write_results(
            results_path,
            config=config,
            splits=splits,
            results=done,
            seconds=time.perf_counter() - start,
            complete=False,
        )

    try:
        results = compare(
            config,
            splits,
            jobs=jobs,
            data_dir=args.data_dir,
            on_result=on_result,
            wrap=_batch_bar(args.progress and jobs == 1, "train"),
        )
    except FloatingPointError as err:
        raise CommandError(f"{err} (partial results in {results_path})") from err
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    summary = summarize(results)
    write_results(
        results_path, config=config, splits=splits, results=results, seconds=seconds, complete=True
    )
    plot_path = out / "tradeoff.png"
    try:
        plot_tradeoff(
            summary,
            plot_path,
            robust=config.robust_attack,
            title=f"{splits.name}, eps={config.eps:g}, {len(config.seeds)} seed(s)",
        )
    except ImportError as err:
        _say(f"no plot: {err}")
        plot_path = None
    _say("")
    _say(
        f"accuracy on {splits.name} test set (%, mean ± std over {len(config.seeds)} seed(s); "
        f"Δ = +MemLoss - base, paired by seed)"
    )
    if splits.synthetic:
        _say("(fake-cifar is random data: these numbers only show the pipeline runs)")
    _say(format_table(summary))
    _say("")
    _say(
        f"wrote {results_path}"
        + (f" and {plot_path}" if plot_path else "")
        + f" in {seconds / 60:.1f} min"
    )
    return 0


# -- entry point ---------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``memloss`` command.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 1 on an error the message explains, 2 on bad usage.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version and usage errors
        return int(exit_.code or 0)
    handler = getattr(args, "handler", None) or getattr(args, "func", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return int(handler(args) or 0)
    except CommandError as err:
        print(f"memloss: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("memloss: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
