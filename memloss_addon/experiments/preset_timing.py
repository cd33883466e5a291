"""Time training steps of a reference preset on synthetic CIFAR-shaped data, with and without
MemLoss.

Each arm (the preset, and its ``+memloss`` variant) is one epoch of exactly ``--steps`` training
steps of :class:`~memloss_addon.experiments.training.TrainingRun` on ``steps x batch`` synthetic
uint8 images held on the device (:class:`~memloss_addon.experiments.gpu_data.DeviceDataset`, the
fast path a CIFAR run takes), with the preset's model, attack and optimiser and the execution
options given (device, bf16 autocast, channels_last, torch.compile). The held-out selection and
the per-epoch curve are off (they are evaluations, not steps). Reported per arm: the epoch's
wall time, the steady step time (after ``--warmup`` steps, the device synchronised at both ends),
images per second, the memory's bytes, the peak device memory and what one CIFAR-10 epoch of
50,000 images would take at the steady rate; and the ``+memloss`` steady step over the base
one. The numbers mean speed only: the data are random.

Usage (what ``benchmarks/gpu_selfcheck.sh`` runs)::

    python -m memloss_addon.experiments.preset_timing --preset trades-wrn-34-10-cifar10 \\
        --steps 200 --device cuda --amp bf16 --channels-last --json preset_timing.json

Example:
    >>> result = time_preset("trades-resnet18-cifar10", steps=2, warmup=1, batch_size=4,
    ...                      sets={"base_width": 2, "steps": 1})
    >>> result["steps"], result["batch_size"], result["steady_ms_per_step"] > 0
    (2, 4, True)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from memloss_addon.data import IndexedDataset
from memloss_addon.experiments.datasets import DatasetSplits
from memloss_addon.experiments.gpu_data import synthetic_cifar
from memloss_addon.experiments.presets import resolve_preset, train_config_kwargs
from memloss_addon.experiments.train_config import TrainConfig

__all__ = ["CIFAR10_TRAIN", "main", "time_preset"]

CIFAR10_TRAIN = 50_000
"""Training images of CIFAR-10, for the estimated epoch time."""


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_preset(
    name: str,
    *,
    steps: int = 200,
    warmup: int = 20,
    batch_size: int | None = None,
    device: str = "cpu",
    amp: str = "off",
    channels_last: bool = False,
    compile: str | None = None,
    memory_device: str = "cpu",
    sets: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Time one epoch of ``steps`` steps of preset ``name`` (see the module docstring).

    Args:
        name: A preset (:func:`~.presets.list_presets`).
        steps: Training steps to time (the epoch's length).
        warmup: Steps before the steady timing starts (compilation, cuDNN autotuning).
        batch_size: The batch (``None``: the preset's).
        device, amp, channels_last, compile, memory_device: How the run executes.
        sets: Other preset overrides, e.g. ``{"widen_factor": 1}``.

    Returns:
        The figures of the arm, as a JSON-ready dict.
    """
    from memloss_addon.experiments.training import TrainingRun

    overrides = dict(sets or {})
    if batch_size is not None:
        overrides["batch_size"] = batch_size
    settings = resolve_preset(name, **{**overrides, "epochs": 1, "holdout": 0})
    values, _ = train_config_kwargs(settings)
    config = TrainConfig(
        **values,
        device=device,
        memory_device=memory_device,
        amp=amp,  # type: ignore[arg-type]
        channels_last=channels_last,
        compile=compile,
        device_data=True,
    )
    batch = config.batch_size
    images, labels = synthetic_cifar(steps * batch, seed=0)
    test_x, test_y = synthetic_cifar(64, seed=1)
    splits = DatasetSplits(
        name="fake-cifar",
        train=IndexedDataset(TensorDataset(images, labels)),  # uint8: held as CIFAR's bytes
        test=TensorDataset(test_x.float() / 255, test_y),
        num_classes=10,
        sample_shape=(3, 32, 32),
        synthetic=True,
    )
    run_device = torch.device(device)
    if run_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run_device)
    run = TrainingRun(config, splits)
    marks: dict[str, float] = {}

    def clock(batches: Iterable[Any]) -> Iterator[Any]:
        for step, batch_ in enumerate(batches):
            if step == warmup:
                _synchronize(run_device)
                marks["steady_start"] = time.perf_counter()
            yield batch_
        _synchronize(run_device)
        marks["end"] = time.perf_counter()

    stats = run.fit(wrap=clock)[0]
    steady_steps = steps - warmup
    steady = (marks["end"] - marks["steady_start"]) / steady_steps if steady_steps > 0 else None
    step_seconds = steady if steady is not None else stats.seconds / steps
    return {
        "preset": name,
        "device": str(run_device),
        "gpu": torch.cuda.get_device_name(run_device) if run_device.type == "cuda" else None,
        "model": config.model,
        "memory": config.memory,
        "amp": amp,
        "channels_last": channels_last,
        "compile": compile,
        "memory_device": memory_device,
        "steps": steps,
        "warmup": warmup,
        "batch_size": batch,
        "attack_steps": config.resolved_steps,
        "epoch_seconds": stats.seconds,
        "steady_ms_per_step": None if steady is None else 1e3 * steady,
        "images_per_second": batch / step_seconds,
        "estimated_cifar10_epoch_seconds": math.ceil(CIFAR10_TRAIN / batch) * step_seconds,
        "memory_bytes": None if run.memory is None else run.memory.nbytes,
        "peak_device_bytes": (
            torch.cuda.max_memory_allocated(run_device) if run_device.type == "cuda" else None
        ),
        "loss": stats.loss,
        "memory_term": stats.memory_term,
    }


def main(argv: list[str] | None = None) -> int:
    from memloss_addon.experiments.preset_commands import parse_setting

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True, help="a base preset; its +memloss variant too")
    parser.add_argument("--steps", type=int, default=200, help="steps per arm (default 200)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed first steps (default 20)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mem-device", default="cpu", help="where the memory lives (default cpu)")
    parser.add_argument("--amp", choices=("off", "bf16"), default="off")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", nargs="?", const="inductor", default=None)
    parser.add_argument(
        "--set", nargs="+", default=[], metavar="KEY=VALUE", help="preset overrides"
    )
    parser.add_argument(
        "--arms", nargs="+", choices=("base", "memloss"), default=["base", "memloss"]
    )
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    base = args.preset.removesuffix("+memloss")
    sets = dict(parse_setting(item) for item in args.set)
    arms: dict[str, dict[str, Any]] = {}
    for arm in args.arms:
        name = base if arm == "base" else base + "+memloss"
        result = time_preset(
            name,
            steps=args.steps,
            warmup=args.warmup,
            batch_size=args.batch_size,
            device=args.device,
            amp=args.amp,
            channels_last=args.channels_last,
            compile=args.compile,
            memory_device=args.mem_device,
            sets=sets,
        )
        arms[arm] = result
        steady = result["steady_ms_per_step"]
        print(
            f"{name}: {args.steps} steps of batch {result['batch_size']} in "
            f"{result['epoch_seconds']:.1f} s; steady "
            + ("-" if steady is None else f"{steady:.1f} ms/step")
            + f", {result['images_per_second']:.0f} img/s; a CIFAR-10 epoch (50,000 images) "
            f"about {result['estimated_cifar10_epoch_seconds'] / 60:.1f} min",
            flush=True,
        )
    document: dict[str, Any] = {"arms": arms}
    if "base" in arms and "memloss" in arms:
        b, m = arms["base"]["steady_ms_per_step"], arms["memloss"]["steady_ms_per_step"]
        if b and m:
            document["memloss_over_base"] = m / b
            print(f"+memloss steady step / base steady step: {m / b:.3f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
