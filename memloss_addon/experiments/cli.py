"""The ``memloss`` command: train, evaluate and compare adversarial training with MemLoss.

Subcommands:

- ``memloss train``: one run of any base objective, with or without the memory; checkpoints after
  every epoch and resumes from a checkpoint.
- ``memloss eval``: a checkpoint against clean, PGD, CW and AutoAttack evaluations.
- ``memloss compare``: every base method with and without MemLoss over several seeds, with a table,
  results.json and a clean-vs-robust plot.
- ``memloss patch``: apply the integration patches to upstream repositories (when installed).

The command's arguments are declared in :mod:`~memloss_addon.experiments.cli_parser`; this
module runs the subcommands, shows progress and prints. The work is done by
:class:`~memloss_addon.experiments.training.TrainingRun`,
:func:`~memloss_addon.experiments.checkpoint_evaluation.evaluate_checkpoint` and
:func:`~memloss_addon.experiments.compare.run_comparison`, imported when a subcommand runs: this
module and the parser import no torch, so ``--help`` and usage errors answer at once.

Example:
    >>> main(["--version"])  # doctest: +ELLIPSIS
    memloss ...
    0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence, Sized
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from memloss_addon.experiments.cli_parser import DIAGNOSTICS_CURVE_SAMPLES, build_parser
from memloss_addon.experiments.compare_config import CompareConfig
from memloss_addon.experiments.train_config import TrainConfig

if TYPE_CHECKING:  # the subcommands import these when they run (torch takes seconds to import)
    from memloss_addon.experiments.compare_runs import RunResult
    from memloss_addon.experiments.datasets import DatasetSplits
    from memloss_addon.experiments.epoch_records import EpochStats
    from memloss_addon.experiments.training import BatchWrapper, TrainingRun

__all__ = ["main"]

_Item = TypeVar("_Item")


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


def _batch_bar(enabled: bool, desc: str) -> BatchWrapper | None:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are optional
        return None

    def wrap(batches: Iterable[Any]) -> Iterable[Any]:
        total = len(batches) if isinstance(batches, Sized) else None
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


# -- shared steps --------------------------------------------------------------------------------


def _open_dataset(load: Callable[[], DatasetSplits]) -> DatasetSplits:
    try:
        splits = load()
    except (ImportError, FileNotFoundError, ValueError) as err:  # ValueError: --augment on digits
        raise CommandError(str(err)) from err
    if splits.synthetic:
        _say(
            f"note: {splits.name} is random data for speed checks only; its accuracies are "
            "meaningless"
        )
    return splits


def _read_checkpoint(path: Path) -> dict[str, Any]:
    from memloss_addon.experiments.checkpoints import load_checkpoint

    try:
        return load_checkpoint(path)
    except (FileNotFoundError, ValueError) as err:
        raise CommandError(str(err)) from err


def _unique(values: Iterable[_Item]) -> tuple[_Item, ...]:
    return tuple(dict.fromkeys(values))


def _default_eps(dataset: str) -> float:
    # 0.15 on digits leaves robust accuracy near 65%, where methods can differ; 8/255 is CIFAR's.
    return 0.15 if dataset == "digits" else 8 / 255


def _describe(config: TrainConfig) -> str:
    replay = f", replay {config.replay_fraction:g}" if config.replay_fraction < 1 else ""
    memory = (
        f"MemLoss on (beta'={config.beta_prime:g}, depth={config.depth}, {config.weighting}, "
        f"{config.memory_dtype}, {config.memory_mode}, bn={config.bn_mode}{replay})"
        if config.memory
        else "MemLoss off"
    )
    start = ""
    if config.attack_init == "memory":
        every = config.attack_reset_every
        start = "; attacks start from the memory" + (
            f" (usual start every {every} epochs)" if every else ""
        )
    return (
        f"{config.method}, eps={config.eps:g}, {config.resolved_steps} step(s) of "
        f"{config.resolved_step_size:g}, {config.epochs} epochs, seed={config.seed}; "
        f"{memory}{start}" + ("; diagnostics on" if config.diagnostics else "")
    )


def _opt_pct(value: float | None) -> str:
    return "-" if value is None else _pct(value)


# -- train ---------------------------------------------------------------------------------------


def _cmd_train(args: argparse.Namespace) -> int:
    from memloss_addon.experiments.epoch_records import write_epoch_records
    from memloss_addon.experiments.evaluation_data import sample_count

    run = _resumed_run(args) if args.resume is not None else _new_run(args)
    splits, config = run.splits, run.config
    out = Path(args.out)
    checkpoint = out / "checkpoint.pt"
    _say(
        f"training on {splits.name} ({len(run.train_splits.train)} train / "
        f"{sample_count(splits.test)} test): {_describe(config)}"
    )
    _say(f"schedule: {run.schedule_description()}")
    if run.holdout_set is not None:
        _say(
            f"held out {config.holdout} training samples (stratified) to keep the best epoch's "
            "weights by PGD-20"
        )
    if config.method == "hat" and not run.helper_trained:
        _say(f"training HAT's helper: {config.helper_epochs} epochs of cross-entropy")

    def report(stats: EpochStats) -> None:
        extra = ""
        if stats.rows_classified is not None and config.diagnostics:
            extra += (
                f", memory acc {_opt_pct(stats.memory_accuracy)}, forgotten "
                f"{stats.rows_forgotten}, recovered {stats.rows_recovered}"
            )
        if stats.curve_pgd_accuracy is not None:
            extra += f", test PGD-20 {_opt_pct(stats.curve_pgd_accuracy)}"
        if stats.holdout_pgd_accuracy is not None:
            extra += f", held-out PGD-20 {_pct(stats.holdout_pgd_accuracy)}"
        _say(
            f"epoch {stats.epoch}/{config.epochs}: loss {stats.loss:.4f}, "
            f"memory term {stats.memory_term:.4f}, train clean {_pct(stats.train_clean_accuracy)}, "
            f"test clean {_pct(stats.test_clean_accuracy)}{extra}, lr {stats.lr:.3g}, "
            f"{stats.seconds:.1f} s ({stats.cpu_seconds:.1f} s CPU)"
        )
        write_epoch_records(run.history, out)

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
    files = write_epoch_records(run.history, out)
    _say(f"per-epoch records: {files[0]} and {files[1]}")
    if config.diagnostics:
        _plot_run(run, out)
    _say(f"saved {checkpoint}; evaluate it with: memloss eval {checkpoint}")
    if run.best is not None:
        _say(
            f"best epoch by held-out PGD-20: {run.best['epoch']} "
            f"({_pct(run.best['holdout_pgd_accuracy'])}); evaluate its weights with: "
            f"memloss eval {checkpoint} --weights best"
        )
    return 0


def _plot_run(run: TrainingRun, out: Path) -> None:
    from memloss_addon.experiments.epoch_records import PLOT_FILE, plot_epoch_curves

    config = run.config
    label = f"{config.method}" + (" + MemLoss" if config.memory else " base")
    try:
        plot_epoch_curves(
            {label: [run.history]},
            out / PLOT_FILE,
            title=f"{run.splits.name}, eps={config.eps:g}, seed {config.seed}",
        )
    except ImportError as err:
        _say(f"no plot: {err}")
        return
    _say(f"plot of forgetting and test robustness per epoch: {out / PLOT_FILE}")


def _new_run(args: argparse.Namespace) -> TrainingRun:
    from memloss_addon.experiments.datasets import load_dataset
    from memloss_addon.experiments.training import TrainingRun

    if args.method is None:
        raise CommandError("--method is required (or pass --resume CHECKPOINT)")
    splits = _open_dataset(
        lambda: load_dataset(args.dataset, data_dir=args.data_dir, augment=args.augment)
    )
    # The training options are stored under TrainConfig's field names.
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {name: value for name, value in vars(args).items() if name in fields}
    given["eps"] = args.eps if args.eps is not None else _default_eps(args.dataset)
    given["curve_samples"] = _curve_samples(args)
    if args.milestones is not None:
        given["milestones"] = tuple(args.milestones)
    try:
        return TrainingRun(TrainConfig(**given), splits)
    except (TypeError, ValueError) as err:
        raise CommandError(str(err)) from err


def _curve_samples(args: argparse.Namespace) -> int | None:
    if args.curve_samples is None and args.diagnostics:
        return DIAGNOSTICS_CURVE_SAMPLES
    return args.curve_samples


def _resumed_run(args: argparse.Namespace) -> TrainingRun:
    from memloss_addon.experiments.checkpoints import recorded_dataset
    from memloss_addon.experiments.training import TrainingRun

    state = _read_checkpoint(args.resume)
    splits = _open_dataset(lambda: recorded_dataset(state, data_dir=args.data_dir))
    try:
        run = TrainingRun.resume(args.resume, splits, device=args.device)
    except ValueError as err:
        raise CommandError(f"cannot resume {args.resume}: {err}") from err
    _say(
        f"resuming {args.resume} after epoch {run.epoch}/{run.config.epochs} "
        f"(training options come from the checkpoint)"
    )
    return run


# -- eval ----------------------------------------------------------------------------------------


def _cmd_eval(args: argparse.Namespace) -> int:
    from memloss_addon.experiments.checkpoint_evaluation import evaluate_checkpoint
    from memloss_addon.experiments.checkpoints import recorded_dataset

    state = _read_checkpoint(args.checkpoint)
    splits = _open_dataset(lambda: recorded_dataset(state, data_dir=args.data_dir))
    try:
        result = evaluate_checkpoint(
            state,
            splits.test,
            eps=args.eps,
            attacks=_unique(args.attacks),
            pgd_steps=args.pgd_steps,
            autoattack=args.autoattack,
            eval_samples=args.eval_samples,
            device=args.device,
            progress=args.progress,
            weights=args.weights,
        )
    except (ImportError, TypeError, ValueError) as err:
        raise CommandError(str(err)) from err
    config = state["config"]
    weights = (
        f"best epoch {result.epoch} of {state['epoch']}"
        if result.weights == "best"
        else f"epoch {state['epoch']}"
    )
    _say(
        f"{args.checkpoint} ({weights}, {config['method']}, "
        f"MemLoss {'on' if config['memory'] else 'off'}), eps={result.eps:g}, "
        f"{result.num_eval} test images:"
    )
    for name, value in result.accuracy.items():
        _say(f"  {name:<11} {_pct(value)}")
    if args.json is not None:
        document = {"checkpoint": str(args.checkpoint), **dataclasses.asdict(result)}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return 0


# -- compare -------------------------------------------------------------------------------------


def _compare_config(args: argparse.Namespace) -> CompareConfig:
    from memloss_addon.checks import positive_int

    given = {
        "epochs": args.epochs,
        "steps": args.steps,
        "attacks": _unique(args.attacks) if args.attacks is not None else None,
        "autoattack": args.autoattack,
        "eval_samples": args.eval_samples,
    }
    try:
        base = CompareConfig.quick() if args.quick else CompareConfig()
        count = len(base.seeds) if args.seeds is None else positive_int("--seeds", args.seeds)
        return dataclasses.replace(
            base,
            methods=_unique(args.methods),
            seeds=tuple(range(args.first_seed, args.first_seed + count)),
            eps=args.eps if args.eps is not None else _default_eps(args.dataset),
            lr=args.lr,
            beta_prime=args.beta_prime,
            device=args.device,
            attack_init=args.attack_init,
            attack_reset_every=args.attack_reset_every,
            replay_fraction=args.replay_fraction,
            diagnostics=args.diagnostics,
            milestones=None if args.milestones is None else tuple(args.milestones),
            holdout=args.holdout,
            curve_samples=_curve_samples(args),
            **{name: value for name, value in given.items() if value is not None},
        )
    except (TypeError, ValueError) as err:
        raise CommandError(str(err)) from err


def _cmd_compare(args: argparse.Namespace) -> int:
    from memloss_addon.checks import positive_int
    from memloss_addon.experiments.compare import RESULTS_FILE, default_jobs, run_comparison
    from memloss_addon.experiments.compare_report import format_table
    from memloss_addon.experiments.compare_runs import run_plan
    from memloss_addon.experiments.datasets import load_dataset

    config = _compare_config(args)
    try:
        jobs = default_jobs() if args.jobs is None else positive_int("--jobs", args.jobs)
    except ValueError as err:
        raise CommandError(str(err)) from err
    splits = _open_dataset(lambda: load_dataset(args.dataset, data_dir=args.data_dir))
    runs = len(run_plan(config))
    _say(
        f"compare on {splits.name}: {len(config.methods)} methods x {len(config.seeds)} seed(s) x "
        f"(base, +MemLoss) = {runs} runs; {config.epochs} epochs, eps={config.eps:g}, "
        f"{config.steps} attack steps, evaluation: {', '.join(config.attacks)}"
        + (f" (AutoAttack {config.autoattack})" if "autoattack" in config.attacks else "")
        + f"; {jobs} parallel job(s)"
    )
    for line in _compare_schedules(config, splits):
        _say(line)
    bar = _runs_bar(args.progress, runs)

    def on_result(result: RunResult, number: int, total: int) -> None:
        if bar is not None:
            bar.update(1)
        accs = ", ".join(f"{n} {_pct(v)}" for n, v in result.accuracy.items())
        _say(
            f"[{number}/{total}] {result.method:<11} {'+MemLoss' if result.memory else 'base    '} "
            f"seed {result.seed}: {accs} (train {result.train_seconds:.0f} s, "
            f"eval {result.eval_seconds:.0f} s)"
        )

    try:
        report = run_comparison(
            config,
            splits,
            out=args.out,
            jobs=jobs,
            data_dir=args.data_dir,
            on_result=on_result,
            wrap=_batch_bar(args.progress and jobs == 1, "train"),
        )
    except ImportError as err:
        raise CommandError(f"{err}, or leave autoattack out of --attacks") from err
    except ValueError as err:  # e.g. --holdout larger than the training set
        raise CommandError(str(err)) from err
    except FloatingPointError as err:
        partial = Path(args.out) / RESULTS_FILE
        raise CommandError(f"{err} (partial results in {partial})") from err
    finally:
        if bar is not None:
            bar.close()
    if report.plot_error is not None:
        _say(f"no plot: {report.plot_error}")
    _say("")
    _say(
        f"accuracy on {splits.name} test set (%, mean ± std over {len(config.seeds)} seed(s); "
        f"Δ = +MemLoss - base, paired by seed)"
    )
    if splits.synthetic:
        _say("(fake-cifar is random data: these numbers only show the pipeline runs)")
    _say(format_table(report.summary))
    if config.holdout:
        from memloss_addon.experiments.compare_report import summarize_best

        _say("")
        _say(f"at each run's best epoch by PGD-20 on {config.holdout} held-out training samples:")
        _say(format_table(summarize_best(report.results)))
    _say("")
    written = [report.results_path, report.plot_path, *report.epoch_files]
    _say(
        f"wrote {', '.join(str(p) for p in written if p is not None)} in "
        f"{report.seconds / 60:.1f} min"
    )
    return 0


def _compare_schedules(config: CompareConfig, splits: DatasetSplits) -> list[str]:
    """One line per distinct learning-rate schedule of the comparison's runs."""
    from memloss_addon.experiments.train_config import describe_lr_schedule
    from memloss_addon.experiments.training_setup import epoch_loader, split_holdout

    lines: dict[str, list[str]] = {}
    train_splits, _ = split_holdout(splits, config.holdout)
    for method in config.methods:
        run_config = config.train_config(method, memory=False, seed=config.seeds[0])
        steps = len(epoch_loader(train_splits, run_config, 0))
        text = describe_lr_schedule(run_config, steps_per_epoch=steps)
        lines.setdefault(text, []).append(method)
    return [f"schedule ({', '.join(methods)}): {text}" for text, methods in lines.items()]


# -- entry point ---------------------------------------------------------------------------------

_COMMANDS: dict[str | None, Callable[[argparse.Namespace], int]] = {
    "train": _cmd_train,
    "eval": _cmd_eval,
    "compare": _cmd_compare,
}


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
    handler = _COMMANDS.get(args.command) or getattr(args, "func", None)
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
