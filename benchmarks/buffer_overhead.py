"""Per-batch cost of reading and writing the memory, against a plain memcpy of the batch.

Usage:
    python benchmarks/buffer_overhead.py [--smoke] [--json PATH] [--rounds N]

For every storage dtype (float32, float16, bfloat16, uint8, int8 perturbation), placement, batch
size and sample shape, one filled memory is timed with ``torch.utils.benchmark`` on the same
random batch of dataset indices (as a shuffled loader gives) in four ways, in the same run:

- ``memcpy``: ``dst.copy_(clean)``, one plain copy of the batch's float32 bytes (the baseline).
- ``gather``: ``index_select`` of the batch's rows from a float32 table of the memory's size,
  the cheapest possible read of scattered rows (a second baseline).
- ``call``: a whole ``MemoryWrapper`` call (checks, read, decode, forward, term, encode, write)
  with a cost-free model whose logits are a view of the input, so that the model's own
  forward and backward cost nothing and what remains is the memory's overhead.
- ``store``: ``MemoryStore.read`` plus ``MemoryStore.write`` alone (gather + decode, encode +
  scatter), without argument checks and term.

The target (at 3x32x32, batch 128): ``call / memcpy`` at most 3 for float32 and float16, at most 4
for uint8 and int8. Every memory holds every row filled (4 batches' worth of samples; 2 for the
3x224x224 batches of 256 and 512, to bound the memory the run needs). The four timings alternate
within each of ``--rounds`` rounds and the median is kept. On a CPU-only placement they count this
process's CPU time (the machine may be shared); the disk-backed placement counts wall time. The
CPU placement covers every shape and batch; the disk-backed and distributed ones (when
``MemoryWrapper`` has them) 3x32x32 and 3x224x224 at batch 128. Pinned-CPU and CUDA placements
run when CUDA is present. ``--smoke`` times only 3x32x32 at batch 128, one short round (tests).

A last section measures a call's cost in two parts, on the CPU placement: its fixed cost, a whole
call at 1x8x8 and batch 128 in float32 (target: at most 250 us), and its marginal cost per byte at
3x32x32, ``(call(512) - call(64)) / (copy(512) - copy(64))`` where a copy moves the batch's float32
bytes twice, the read and the write a call must do (targets: at most 3 for float32, 5 for uint8
and int8).
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from _common import RESULTS_DIR, interleaved_medians, print_metadata, run_metadata, write_json
from torch import nn

from memloss_addon import MemoryWrapper

DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "float32": (torch.float32, "example"),
    "float16": (torch.float16, "example"),
    "bfloat16": (torch.bfloat16, "example"),
    "uint8": (torch.uint8, "example"),
    "int8 (perturbation)": (torch.int8, "perturbation"),
}
# Ratio call / memcpy the memory must stay under at the target configuration.
TARGETS = {"float32": 3.0, "float16": 3.0, "uint8": 4.0, "int8 (perturbation)": 4.0}
TARGET_SHAPE, TARGET_BATCH = (3, 32, 32), 128
FIXED_COST_TARGET_US = 250.0  # a whole call at 1x8x8, batch 128, float32
MARGINAL_TARGETS = {"float32": 3.0, "uint8": 5.0, "int8 (perturbation)": 5.0}  # at 3x32x32
SHAPES = ((1, 8, 8), (3, 32, 32), (3, 64, 64), (3, 224, 224))
BATCHES = (64, 128, 256, 512)
EPS = 8 / 255
NUM_CLASSES = 10
DISK_PLACEHOLDER = "<scratch folder>"
LARGE_BATCH_BYTES = 100e6
# Shapes and batches of the placements other than "cpu" (to keep the run's time reasonable).
REDUCED_GRID = (
    ((3, 32, 32), (3, 224, 224)),
    (128,),
)  # above this many float32 bytes per batch the memory holds 2 batches


class FreeModel(nn.Module):
    """Logits that cost nothing: the first ``NUM_CLASSES`` input values (a view)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :NUM_CLASSES]


@dataclass(frozen=True)
class Placement:
    """Where a benchmarked memory lives and how its time is counted."""

    name: str
    options: dict[str, Any]  # MemoryWrapper keyword arguments
    batch_device: torch.device
    cpu_time: bool  # count process CPU time (CPU-only work) instead of wall time
    note: str = ""
    full_grid: bool = True  # every shape and batch; otherwise REDUCED_GRID only


def placements() -> tuple[list[Placement], list[str]]:
    """The placements available here, and a line for each one skipped."""
    cpu = torch.device("cpu")
    found = [Placement("cpu", {"device": "cpu", "pin_memory": False}, cpu, cpu_time=True)]
    skipped = []
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        pinned = {"device": "cpu", "pin_memory": True}
        found.append(Placement("cpu-pinned -> cuda", pinned, cuda, cpu_time=False))
        found.append(Placement("cuda", {"device": "cuda"}, cuda, cpu_time=False))
    else:
        skipped.append("CUDA is not available: the pinned-CPU and CUDA placements are skipped.")
    parameters = inspect.signature(MemoryWrapper).parameters
    if "storage_path" in parameters:
        found.append(
            Placement(
                "disk (memmap)",
                {"storage_path": DISK_PLACEHOLDER},
                cpu,
                cpu_time=False,
                note="the page cache and the disk work for the call",
                full_grid=False,
            )
        )
    else:
        skipped.append("MemoryWrapper has no disk-backed placement (storage_path): skipped.")
    if "distributed" in parameters and dist.is_available():
        found.append(
            Placement(
                "sharded, 1 rank (gloo)",
                {"distributed": "sharded"},
                cpu,
                cpu_time=True,
                note="one process: the collectives' code path, not a network",
                full_grid=False,
            )
        )
    else:
        skipped.append("MemoryWrapper has no distributed placement: skipped.")
    return found, skipped


def init_single_process_group(scratch: Path) -> None:
    """A one-rank gloo group, so that the distributed store's code path can be timed."""
    if not dist.is_initialized():
        dist.init_process_group(
            "gloo", init_method=f"file://{scratch / 'rendezvous'}", rank=0, world_size=1
        )


def num_rows_for(batch: int, shape: tuple[int, ...]) -> int:
    batches = 4 if batch * math.prod(shape) * 4 <= LARGE_BATCH_BYTES else 2
    return batch * batches


def measure(
    *,
    placement: Placement,
    dtype_name: str,
    batch: int,
    shape: tuple[int, ...],
    rounds: int,
    min_run_time: float,
    scratch: Path,
) -> dict[str, Any]:
    """Times memcpy, gather, a whole call and the bare store for one configuration."""
    dtype, mode = DTYPES[dtype_name]
    batch_device = placement.batch_device
    generator = torch.Generator().manual_seed(0)
    num_rows = num_rows_for(batch, shape)
    clean = torch.rand(batch, *shape, generator=generator).to(batch_device)
    step = EPS * torch.randint(-1, 2, clean.shape, generator=generator).to(batch_device)
    adv = (clean + step).clamp_(0.0, 1.0)
    logits = torch.zeros(batch, NUM_CLASSES, device=batch_device, requires_grad=True)
    targets = torch.randint(0, NUM_CLASSES, (batch,), generator=generator).to(batch_device)
    indices = torch.randperm(num_rows, generator=generator)[:batch]

    kwargs = dict(placement.options)
    if kwargs.get("storage_path") == DISK_PLACEHOLDER:
        shape_name = "x".join(map(str, shape))
        folder = scratch / f"memory-{dtype_name.split()[0]}-{shape_name}-{batch}-{num_rows}"
        kwargs["storage_path"] = str(folder)
    memory = MemoryWrapper(FreeModel(), num_rows, shape, dtype=dtype, mode=mode, eps=EPS, **kwargs)
    for first in range(0, num_rows, batch):  # fill every slot, so every read returns B rows
        memory(torch.arange(first, first + batch), clean, adv, logits, targets)
    assert memory.stats()["filled_fraction"] == 1.0

    destination = torch.empty_like(clean)
    table = torch.rand(num_rows, *shape, generator=generator).to(memory.device)
    store = memory.store

    def memcpy() -> None:
        destination.copy_(clean)

    def gather() -> None:
        table.index_select(0, indices.to(table.device)).to(batch_device)

    def call() -> None:
        memory(indices, clean, adv, logits, targets)

    def store_read_write() -> None:
        store.read(indices, clean)
        store.write(indices, adv, clean)

    # CPU time on a CPU-only placement: the machine may be shared; wall time where a device or a
    # disk works for us.
    clock = time.process_time if placement.cpu_time else time.perf_counter
    times = interleaved_medians(
        {"memcpy": memcpy, "gather": gather, "call": call, "store": store_read_write},
        rounds=rounds,
        min_run_time=min_run_time,
        clock=clock,
    )
    target = TARGETS.get(dtype_name)
    at_target = tuple(shape) == TARGET_SHAPE and batch == TARGET_BATCH
    ratio = times["call"] / times["memcpy"]
    return {
        "placement": placement.name,
        "clock": "process CPU time" if placement.cpu_time else "wall time",
        "dtype": dtype_name,
        "batch": batch,
        "shape": "x".join(map(str, shape)),
        "num_rows": num_rows,
        "batch_mb": clean.nbytes / 1e6,
        **{f"{name}_us": seconds * 1e6 for name, seconds in times.items()},
        "call_over_memcpy": ratio,
        "call_over_gather": times["call"] / times["gather"],
        "store_over_memcpy": times["store"] / times["memcpy"],
        "target": target if at_target else None,
        "passed": (ratio <= target) if (at_target and target is not None) else None,
    }


def format_row(row: dict[str, Any]) -> str:
    verdict = "" if row["passed"] is None else ("PASS" if row["passed"] else "FAIL")
    target = f"<= {row['target']:.0f}x" if row["target"] is not None else ""
    return (
        f"{row['shape']:>10s} {row['batch']:>5d} {row['dtype']:>20s} {row['memcpy_us']:>10.1f}"
        f" {row['gather_us']:>10.1f} {row['call_us']:>10.1f} {row['store_us']:>10.1f}"
        f" {row['call_over_memcpy']:>8.2f} {row['call_over_gather']:>8.2f}"
        f" {row['store_over_memcpy']:>8.2f}  {target:>6s} {verdict}"
    )


HEADER = (
    f"{'shape':>10s} {'batch':>5s} {'dtype':>20s} {'memcpy us':>10s} {'gather us':>10s}"
    f" {'call us':>10s} {'store us':>10s} {'call/cpy':>8s} {'call/gth':>8s} {'store/cpy':>8s}"
    "  target"
)


def call_costs(rows: list[dict[str, Any]], *, rounds: int, min_run_time: float) -> dict[str, Any]:
    """The fixed and marginal cost of a call on the CPU, from ``rows`` or measured now."""
    cpu = next(p for p in placements()[0] if p.name == "cpu")

    def row(shape: tuple[int, ...], batch: int, dtype_name: str) -> dict[str, Any]:
        name = "x".join(map(str, shape))
        for found in rows:
            if (found["placement"], found["shape"], found["batch"], found["dtype"]) == (
                "cpu",
                name,
                batch,
                dtype_name,
            ):
                return found
        measured = measure(
            placement=cpu,
            dtype_name=dtype_name,
            batch=batch,
            shape=shape,
            rounds=rounds,
            min_run_time=min_run_time,
            scratch=Path(tempfile.gettempdir()),
        )
        extra.append(measured)
        return measured

    extra: list[dict[str, Any]] = []
    fixed = row((1, 8, 8), 128, "float32")["call_us"]
    marginal = {}
    for name, target in MARGINAL_TARGETS.items():
        small, large = row(TARGET_SHAPE, 64, name), row(TARGET_SHAPE, 512, name)
        extra_call = large["call_us"] - small["call_us"]
        extra_copies = 2 * (large["memcpy_us"] - small["memcpy_us"])
        ratio = extra_call / extra_copies
        marginal[name] = {
            "call_64_us": small["call_us"],
            "call_512_us": large["call_us"],
            "memcpy_64_us": small["memcpy_us"],
            "memcpy_512_us": large["memcpy_us"],
            "ratio": ratio,
            "target": target,
            "passed": ratio <= target,
        }
    return {
        "fixed_us": fixed,
        "fixed_target_us": FIXED_COST_TARGET_US,
        "fixed_passed": fixed <= FIXED_COST_TARGET_US,
        "marginal": marginal,
        "measured_for_this": extra,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="3x32x32 at batch 128, one round")
    parser.add_argument("--json", default=None, help="where to write the results as JSON")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds per number")
    args = parser.parse_args(argv)
    shapes = (TARGET_SHAPE,) if args.smoke else SHAPES
    batches = (TARGET_BATCH,) if args.smoke else BATCHES
    rounds = args.rounds or (1 if args.smoke else 3)
    min_run_time = 0.02 if args.smoke else 0.1
    json_path = args.json or (None if args.smoke else RESULTS_DIR / "buffer_overhead.json")

    meta = run_metadata([sys.executable, *sys.argv])
    print_metadata(meta)
    print(
        "Times per batch (median of torch.utils.benchmark medians). memcpy: one copy of the "
        "batch's float32 bytes; gather: index_select of its rows from a float32 table; call: a "
        "whole MemoryWrapper call with a cost-free model; store: MemoryStore read + write."
    )
    found, skipped = placements()
    for line in skipped:
        print(line)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        if any("distributed" in p.options for p in found):
            init_single_process_group(Path(scratch))
        for placement in found:
            clock = "process CPU time" if placement.cpu_time else "wall time"
            note = f"; {placement.note}" if placement.note else ""
            print(f"\nplacement: {placement.name} ({clock}{note})")
            print(HEADER)
            grid = (shapes, batches) if placement.full_grid or args.smoke else REDUCED_GRID
            for shape in grid[0]:
                for batch in grid[1]:
                    for dtype_name in DTYPES:
                        row = measure(
                            placement=placement,
                            dtype_name=dtype_name,
                            batch=batch,
                            shape=shape,
                            rounds=rounds,
                            min_run_time=min_run_time,
                            scratch=Path(scratch),
                        )
                        rows.append(row)
                        print(format_row(row), flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()
    costs = call_costs(rows, rounds=rounds, min_run_time=min_run_time)
    print("\nA call's cost on the CPU (process CPU time):")
    fixed = costs["fixed_us"]
    print(
        f"  fixed: {fixed:.0f} us at 1x8x8, batch 128, float32 (target <= "
        f"{FIXED_COST_TARGET_US:.0f} us: {'PASS' if costs['fixed_passed'] else 'FAIL'})"
    )
    for name, entry in costs["marginal"].items():
        verdict = "PASS" if entry["passed"] else "FAIL"
        print(
            f"  marginal per byte, {name}: {entry['ratio']:.2f} x two float32 copies "
            f"(target <= {entry['target']:.0f}: {verdict})"
        )
    checked = [r for r in rows if r["passed"] is not None]
    print("\nTarget at 3x32x32, batch 128 (call / memcpy):")
    for row in checked:
        verdict = "PASS" if row["passed"] else "FAIL"
        print(
            f"  {row['placement']:>24s} {row['dtype']:>20s} {row['call_over_memcpy']:6.2f}"
            f" <= {row['target']:.0f}  {verdict}"
        )
    if json_path is not None:
        write_json(json_path, {"meta": meta, "rows": rows, "call_costs": costs})
        print(f"\nwrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
