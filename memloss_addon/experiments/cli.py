"""The ``memloss`` command: train, evaluate and compare adversarial training with MemLoss.

Subcommands:

- ``memloss train``: one run of any base objective, with or without the memory, or of a reference
  preset (``--preset``); checkpoints after every epoch, continues a killed run, and can end with
  a final AutoAttack evaluation of the kept weights.
- ``memloss eval``: a checkpoint (or a published one, ``--reference-source``) against clean, PGD,
  CW and AutoAttack evaluations.
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
import contextlib
import dataclasses
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from memloss_addon.experiments.cli_parser import DIAGNOSTICS_CURVE_SAMPLES, build_parser
from memloss_addon.experiments.compare_config import CompareConfig
from memloss_addon.experiments.train_config import EXECUTION_FIELDS, TrainConfig
from memloss_addon.experiments.train_settings import (
    TrainRequest,
    default_eps,
    dry_run_lines,
    execution_overrides,
    resolve_train_request,
    typed_options,
)

if TYPE_CHECKING:  # the subcommands import these when they run (torch takes seconds to import)
    from memloss_addon.experiments.compare_runs import RunResult
    from memloss_addon.experiments.datasets import DatasetSplits
    from memloss_addon.experiments.epoch_records import EpochStats
    from memloss_addon.experiments.names import DatasetName, ModelState
    from memloss_addon.experiments.training import BatchWrapper, TrainingRun

__all__ = ["main"]

_Item = TypeVar("_Item")


class CommandError(Exception):
    """An error the command reports in one line, with what to do about it."""


# -- output helpers ------------------------------------------------------------------------------


_log_files: list[Path] = []  # where _say also writes (the run's log while training)


def _say(message: str) -> None:
    try:
        from tqdm import tqdm
    except ImportError:
        print(message, flush=True)
    else:
        tqdm.write(message)  # keeps open progress bars intact
    for path in _log_files:
        with path.open("a", encoding="utf-8") as handle:
            handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")


@contextlib.contextmanager
def _logging_to(path: Path) -> Iterator[None]:
    """Every _say line also goes to ``path``, time-stamped (appended: a continued run adds)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _log_files.append(path)
    try:
        yield
    finally:
        _log_files.remove(path)


def _batch_bar(enabled: bool, desc: str) -> BatchWrapper | None:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are optional
        return None

    def wrap(batches: Iterable[Any]) -> Iterable[Any]:
        samples = getattr(batches, "samples", None)
        if samples is None:
            total = len(batches) if isinstance(batches, Sized) else None
            return tqdm(batches, total=total, desc=desc, leave=False, unit="batch")
        return _images_bar(batches, tqdm(total=samples, desc=desc, leave=False, unit="img"))

    return wrap


def _images_bar(batches: Iterable[Any], bar: Any) -> Iterator[Any]:
    """Moves ``bar`` by each batch's images once the step on it is done: images per second."""
    try:
        for batch in batches:
            yield batch
            bar.update(len(batch[1]))
    finally:
        bar.close()


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


_default_eps = default_eps


def _describe(config: TrainConfig) -> str:
    replay = f", replay {config.replay_fraction:g}" if config.replay_fraction < 1 else ""
    memory = (
        f"MemLoss on (beta'={config.beta_prime:g}, depth={config.depth}, {config.weighting}, "
        f"{config.memory_dtype}, {config.memory_mode}, bn={config.bn_mode}{replay}"
        f"{', aligned with the augmentation' if config.memory_aligned else ''})"
        if config.memory
        else "MemLoss off"
    )
    start = ""
    if config.attack_init == "memory":
        every = config.attack_reset_every
        start = "; attacks start from the memory" + (
            f" (usual start every {every} epochs)" if every else ""
        )
    fast = [
        f"device {config.device}",
        f"memory on {config.memory_device}",
        "data on the device" if config.resolved_device_data else "DataLoader",
    ]
    if config.amp != "off":
        fast.append(f"{config.amp} autocast")
    if config.channels_last:
        fast.append("channels_last")
    if config.compile is not None:
        fast.append(f"torch.compile ({config.compile})")
    return (
        f"{config.method}, eps={config.eps:g}, {config.resolved_steps} step(s) of "
        f"{config.resolved_step_size:g}, {config.epochs} epochs, seed={config.seed}; "
        f"{memory}{start}"
        + ("; diagnostics on" if config.diagnostics else "")
        + ("; random crop and flip" if config.augment else "")
        + f"; {', '.join(fast)}"
    )


def _opt_pct(value: float | None) -> str:
    return "-" if value is None else _pct(value)


# -- train ---------------------------------------------------------------------------------------


def _cmd_train(args: argparse.Namespace) -> int:
    if args.dry_run:
        return _dry_run(args)
    if args.out is None:
        raise CommandError("--out is required (unless --dry-run)")
    out = Path(args.out)
    final_eval = args.final_eval if args.final_eval is not None else args.preset is not None
    if final_eval and importlib.util.find_spec("torchattacks") is None:
        raise CommandError(
            "the final evaluation runs AutoAttack, which needs torchattacks: pip install "
            '"memloss-addon[attacks]", or pass --no-final-eval'
        )
    with _logging_to(out / "train.log"):
        run = _resumed_run(args) if args.resume is not None else _new_run(args, out)
        _train(run, args, out)
        if final_eval:
            _final_eval(run, args, out)
    return 0


def _train(run: TrainingRun, args: argparse.Namespace, out: Path) -> None:
    from memloss_addon.experiments.epoch_records import write_epoch_records
    from memloss_addon.experiments.evaluation_data import sample_count

    splits, config = run.splits, run.config
    checkpoint = out / "checkpoint.pt"
    train_size = len(run.train_splits.train)
    _say(
        f"training on {splits.name} ({train_size} train / {sample_count(splits.test)} test): "
        f"{_describe(config)}"
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
        rate = train_size / max(stats.seconds, 1e-9)
        _say(
            f"epoch {stats.epoch}/{config.epochs}: loss {stats.loss:.4f}, "
            f"memory term {stats.memory_term:.4f}, train clean {_pct(stats.train_clean_accuracy)}, "
            f"test clean {_pct(stats.test_clean_accuracy)}{extra}, lr {stats.lr:.3g}, "
            f"{stats.seconds:.1f} s ({stats.cpu_seconds:.1f} s CPU, {rate:.0f} img/s), "
            f"evaluation {stats.eval_seconds:.1f} s"
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
    _say(f"per-epoch records: {files[0]} and {files[1]}; log: {out / 'train.log'}")
    if config.diagnostics:
        _plot_run(run, out)
    _say(f"saved {checkpoint}; evaluate it with: memloss eval {checkpoint}")
    if run.best is not None:
        _say(
            f"best epoch by held-out PGD-20: {run.best['epoch']} "
            f"({_pct(run.best['holdout_pgd_accuracy'])}); evaluate its weights with: "
            f"memloss eval {checkpoint} --weights best"
        )


FINAL_EVAL_FILE = "final_eval.json"


def _final_eval(run: TrainingRun, args: argparse.Namespace, out: Path) -> None:
    """Clean, PGD-20 and AutoAttack accuracy of the kept weights, once per finished run."""
    from memloss_addon.experiments.checkpoint_evaluation import evaluate_checkpoint

    path = out / FINAL_EVAL_FILE
    weights: ModelState = "best" if run.best is not None else "last"
    key = {
        "trained_epochs": run.epoch,
        "weights": weights,
        "autoattack": args.final_autoattack,
        "eval_samples": args.final_eval_samples,
    }
    if path.is_file():
        done = json.loads(path.read_text(encoding="utf-8"))
        if {k: done.get(k) for k in key} == key:
            _say(f"final evaluation done already: {path}")
            return
    _say(
        f"final evaluation of the {weights} weights: clean, PGD-20 and AutoAttack "
        f"({args.final_autoattack}) on the test set"
    )
    try:
        result = evaluate_checkpoint(
            run.state_dict(),
            run.splits.test,
            attacks=("clean", "pgd", "autoattack"),
            autoattack=args.final_autoattack,
            eval_samples=args.final_eval_samples,
            device=run.device,
            progress=args.progress,
            weights=weights,
        )
    except (ImportError, TypeError, ValueError) as err:
        raise CommandError(str(err)) from err
    document = {**key, "checkpoint": str(out / "checkpoint.pt"), **dataclasses.asdict(result)}
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    accs = ", ".join(f"{name} {_pct(value)}" for name, value in result.accuracy.items())
    _say(
        f"final ({weights} weights, epoch {result.epoch}, eps {result.eps:g}, "
        f"{result.num_eval} test images): {accs}; wrote {path}"
    )


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


def _check_devices(config: TrainConfig) -> None:
    """A CUDA device asked for on a machine without one is a one-line error, not a traceback."""
    import torch

    for option, device in (("--device", config.device), ("--mem-device", config.memory_device)):
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise CommandError(f"{option} {device}: CUDA is not available here")


def _train_request(args: argparse.Namespace) -> tuple[TrainRequest, TrainConfig]:
    try:
        request = resolve_train_request(args)
        return request, request.config()
    except (TypeError, ValueError) as err:
        raise CommandError(str(err)) from err


def _dry_run(args: argparse.Namespace) -> int:
    if args.resume is not None:
        raise CommandError("--dry-run shows a new run; a resumed one keeps its checkpoint's")
    request, config = _train_request(args)
    for line in dry_run_lines(request, config, data_dir=args.data_dir):
        print(line)
    return 0


def _new_run(args: argparse.Namespace, out: Path) -> TrainingRun:
    from memloss_addon.experiments.datasets import load_dataset
    from memloss_addon.experiments.training import TrainingRun

    request, config = _train_request(args)
    _check_devices(config)
    splits = _open_dataset(lambda: load_dataset(request.dataset, data_dir=args.data_dir))
    previous = out / "checkpoint.pt"
    if previous.is_file():
        return _continued_run(previous, config, splits)
    try:
        return TrainingRun(config, splits)
    except (TypeError, ValueError) as err:
        raise CommandError(str(err)) from err


def _definition(values: dict[str, Any]) -> dict[str, Any]:
    """A config's fields that define the run (all but the execution ones)."""
    full = TrainConfig.from_dict(values).to_dict()  # older checkpoints: defaults filled in
    return {k: v for k, v in full.items() if k not in EXECUTION_FIELDS}


def _continued_run(path: Path, config: TrainConfig, splits: DatasetSplits) -> TrainingRun:
    """The run of the checkpoint in --out when it is this command's run (killed earlier)."""
    from memloss_addon.experiments.training import TrainingRun

    state = _read_checkpoint(path)
    same = _definition(state["config"]) == _definition(config.to_dict())
    if not same or state["dataset"]["name"] != splits.name:
        raise CommandError(
            f"{path} holds another run (its config or dataset differs from this command's); "
            "choose another --out, delete it, or continue it with --resume"
        )
    overrides = {k: getattr(config, k) for k in EXECUTION_FIELDS}
    try:
        run = TrainingRun.resume(path, splits, **overrides)
    except ValueError as err:
        raise CommandError(f"cannot continue {path}: {err}") from err
    _say(f"continuing the run in {path.parent} after epoch {run.epoch}/{run.config.epochs}")
    return run


def _curve_samples(args: argparse.Namespace) -> int | None:
    if args.curve_samples is None and args.diagnostics:
        return DIAGNOSTICS_CURVE_SAMPLES
    return args.curve_samples


def _resumed_run(args: argparse.Namespace) -> TrainingRun:
    from memloss_addon.experiments.checkpoints import recorded_dataset
    from memloss_addon.experiments.training import TrainingRun

    state = _read_checkpoint(args.resume)
    splits = _open_dataset(lambda: recorded_dataset(state, data_dir=args.data_dir))
    overrides = execution_overrides(args)
    _check_devices(TrainConfig.from_dict({**state["config"], **overrides}))
    try:
        run = TrainingRun.resume(args.resume, splits, **overrides)
    except ValueError as err:
        raise CommandError(f"cannot resume {args.resume}: {err}") from err
    ignored = sorted(set(typed_options(args)) - set(overrides))
    if args.preset is not None or args.set:
        ignored.insert(0, "preset" if args.preset is not None else "set")
    flags = ", ".join("--" + name.replace("_", "-") for name in ignored)
    _say(
        f"resuming {args.resume} after epoch {run.epoch}/{run.config.epochs} "
        f"(training options come from the checkpoint" + (f"; ignored: {flags})" if flags else ")")
    )
    return run


# -- eval ----------------------------------------------------------------------------------------


_REFERENCE_OPTIONS = ("model", "dataset", "normalization", "base_width", "widen_factor")


def _cmd_eval(args: argparse.Namespace) -> int:
    from memloss_addon.experiments.checkpoint_evaluation import evaluate_checkpoint
    from memloss_addon.experiments.checkpoints import recorded_dataset

    if args.reference_source is not None:
        return _eval_reference(args)
    given = [name for name in _REFERENCE_OPTIONS if getattr(args, name) is not None]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise CommandError(
            f"{flags} describe(s) a published checkpoint: pass --reference-source too (a "
            "checkpoint of memloss train records its model and dataset)"
        )
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
    _report_evaluation(args, result)
    return 0


def _report_evaluation(args: argparse.Namespace, result: Any, **extra: Any) -> None:
    for name, value in result.accuracy.items():
        _say(f"  {name:<11} {_pct(value)}")
    if args.json is not None:
        document = {"checkpoint": str(args.checkpoint), **extra, **dataclasses.asdict(result)}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def _eval_reference(args: argparse.Namespace) -> int:
    """``memloss eval FILE --reference-source S --model M``: a published checkpoint."""
    from memloss_addon.experiments.checkpoint_evaluation import (
        evaluate_reference_checkpoint,
        reference_defaults,
    )
    from memloss_addon.experiments.datasets import load_dataset

    if args.model is None:
        raise CommandError("--reference-source needs --model, the architecture the file holds")
    if args.weights != "last":
        raise CommandError("--weights best is for checkpoints of memloss train --holdout")
    dataset: DatasetName = args.dataset or "cifar10"
    splits = _open_dataset(lambda: load_dataset(dataset, data_dir=args.data_dir))
    normalization = args.normalization or reference_defaults(args.reference_source, dataset)[0]
    try:
        result = evaluate_reference_checkpoint(
            args.checkpoint,
            splits.test,
            source=args.reference_source,
            model=args.model,
            num_classes=splits.num_classes,
            sample_shape=splits.sample_shape,
            normalization=normalization,
            base_width=args.base_width,
            widen_factor=args.widen_factor,
            dataset=dataset,
            eps=args.eps,
            attacks=_unique(args.attacks),
            pgd_steps=args.pgd_steps,
            autoattack=args.autoattack,
            eval_samples=args.eval_samples,
            device=args.device,
            progress=args.progress,
        )
    except (FileNotFoundError, ImportError, TypeError, ValueError) as err:
        raise CommandError(str(err)) from err
    _say(
        f"{args.checkpoint} ({args.reference_source} checkpoint, {args.model}, normalization "
        f"{normalization}), eps={result.eps:g}, {result.num_eval} {splits.name} test images:"
    )
    _report_evaluation(
        args,
        result,
        reference_source=args.reference_source,
        model=args.model,
        normalization=normalization,
        dataset=dataset,
    )
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
