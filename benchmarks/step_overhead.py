"""Time of one adversarial training step with MemLoss divided by the same step without it.

Usage:
    python benchmarks/step_overhead.py [--smoke] [--json PATH] [--reps N] [--batch B]

For each base method (TRADES-10, PGD-AT-10, MART-10, HAT-10, ST-10 and single-step), one model
(``memloss_addon.experiments.models.SmallResNet``, about 0.2M parameters) trains on random
3x32x32 data with SGD, and these steps are timed interleaved, in a rotating order, in every
repetition:

- ``base``: the reference objective, ``backward()`` and an optimizer step;
- ``memory dK``: the same plus a ``MemoryWrapper`` call of depth K = 1, 2, 4 whose slots are all
  filled, so every call runs the memory forward pass on K x B stored examples;
- ``floor``: the base step plus one extra forward and backward pass of the batch (a small
  cross-entropy on this step's adversarial examples) and a gradient through the clean logits
  (a small cross-entropy on them): the least a depth-1 memory can cost, since the MemLoss term
  runs the model on B stored examples and its gradient flows through both its KL arguments.
  For TRADES, MART, HAT and ST the clean logits are in the base loss already; PGD-AT and
  single-step compute them in an extra forward pass that the base loss does not backpropagate.

For TRADES-10 more variants run in the same repetitions:

- ``memory d1 disk``: the depth-1 step with a memory kept in a folder on disk
  (``storage_path``, a memory-mapped file) instead of RAM;
- ``replay 0.5``: the depth-1 step with ``replay_fraction=0.5`` (half the memory rows go through
  the model; target: at most 1.06 x the base step);
- ``started kS`` for S = 1, 2, 3, 5: no MemLoss term; the attack starts from the memory
  (``recall``) and takes S steps, and the memory stores the new examples (``beta_prime=0``).

Times are medians over the repetitions of each step's CPU time (``time.process_time``: this
process's CPU time, which leaves out time spent waiting for other processes on a shared machine);
wall-clock medians are reported next to them. Seeds are fixed. The target: TRADES-10 with a
depth-1 memory at most 1.10 x the base step.

A distributed section then runs TRADES-10 (the same model, the same batch per rank) in 2
processes on ``gloo`` with a ``DistributedDataParallel`` model: the base step, the step with a
filled depth-1 ``distributed="sharded"`` memory and with a ``"replicated"`` one, interleaved in
rotating order. Every rank waits at a barrier before each step and times it by the wall clock
(CPU time of a rank leaves out its waits for the other rank, which are part of a distributed
step); a step's time is that of its slower rank. Each rank's batch holds ``batch / 2`` samples
owned by each rank, so the communicated bytes per step are fixed and are checked against the
figure expected from the collectives. The sharded step is also divided by the single-process
depth-1 step of the main table, both by the wall clock.

``--smoke`` runs a tiny model on batches of 8 with 2 attack steps and one repetition (for tests).

Focused mode (any of ``--model``, ``--device``, ``--methods``, ``--mem-configs``, ``--amp``,
``--channels-last``): only the methods named, on the model named (``small-resnet``, the default,
or a paper-scale architecture such as ``resnet18``, unnormalized as TRADES trains it), on
``--device``, with the variants ``base`` and one depth-1 memory per ``--mem-configs`` entry
``PLACEMENT-DTYPE``: placement ``cpu`` (a CPU memory, no pinned buffers), ``pinned`` (a CPU
memory read to CUDA through pinned staging buffers; CUDA only) or ``gpu`` (the memory on the
device); dtype ``fp32``, ``fp16``, ``bf16`` or ``uint8``. Steps are timed by the wall clock with
the device synchronised before and after each step (the CPU time of a host that waits for a GPU
says nothing), interleaved in rotating order; no distributed section. It reports each memory's
median step over the base step (target :data:`FOCUSED_MEMORY_TARGET`) and, when both are timed,
the ``pinned-fp16`` step over the ``gpu-fp32`` step (target :data:`FOCUSED_PINNED_TARGET`).
For example, what ``benchmarks/gpu_selfcheck.sh`` runs::

    python benchmarks/step_overhead.py --model resnet18 --device cuda --batch 128 \
        --methods trades --mem-configs pinned-fp16 gpu-fp32 --reps 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from _common import RESULTS_DIR, print_metadata, run_metadata, write_json
from torch.nn.parallel import DistributedDataParallel

from memloss_addon import MemoryWrapper, objectives
from memloss_addon.experiments.models import SmallResNet
from memloss_addon.objectives.pgd import uniform_start

EPS = 8 / 255
TARGET = ("TRADES-10", 1.10)
DEPTHS = (1, 2, 4)
REPLAY = "replay 0.5"
STARTED = "started"
STARTED_STEPS = (1, 2, 3, 5)
REPLAY_TARGET = 1.06
DISK = "memory d1 disk"
WORLD_SIZE = 2
LAYOUTS = ("sharded", "replicated")


def method_table(steps: int) -> dict[str, tuple[Callable[..., Any], dict[str, Any]]]:
    """Label -> (objective, keyword arguments), with each method's usual regularizer weight."""
    multi = {"eps": EPS, "step_size": EPS / 4, "steps": steps}
    return {
        f"TRADES-{steps}": (objectives.trades, {**multi, "beta": 6.0}),
        f"PGD-AT-{steps}": (objectives.pgd_at, multi),
        f"MART-{steps}": (objectives.mart, {**multi, "beta": 5.0}),
        f"HAT-{steps}": (objectives.hat, {**multi, "beta": 2.5, "h": 2.0, "gamma": 0.5}),
        f"ST-{steps}": (objectives.squeeze, {**multi, "beta": 6.0}),
        "single-step": (
            objectives.single_step,
            {"eps": EPS, "step_size": 1.25 * EPS, "steps": 1, "reg_weight": 1.0},
        ),
    }


class StepBench:
    """One method's model, optimizer, data and memories, and its timed step variants."""

    def __init__(
        self,
        objective: Callable[..., Any],
        kwargs: dict[str, Any],
        *,
        batch: int,
        widths: tuple[int, int, int],
        seed: int,
        storage_path: str | None = None,
        extras: bool = False,
    ) -> None:
        torch.manual_seed(seed)
        self.objective = objective
        self.kwargs = dict(kwargs)
        self.model = SmallResNet(widths=widths)
        if objective is objectives.hat:  # HAT's frozen helper model
            helper = SmallResNet(widths=widths).eval()
            for p in helper.parameters():
                p.requires_grad_(False)
            self.kwargs["helper"] = helper
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.batch = batch
        num_samples = 4 * batch
        self.x = torch.rand(num_samples, 3, 32, 32)
        self.y = torch.randint(0, 10, (num_samples,))
        self.order = torch.randperm(num_samples)
        self.position = 0
        self.memories: dict[int | str, MemoryWrapper] = {
            depth: MemoryWrapper(self.model, num_samples, (3, 32, 32), depth=depth, eps=EPS)
            for depth in DEPTHS
        }
        self.variants = ["base", *(f"memory d{d}" for d in DEPTHS), "floor"]
        if storage_path is not None:
            self.memories[DISK] = MemoryWrapper(
                self.model, num_samples, (3, 32, 32), depth=1, eps=EPS, storage_path=storage_path
            )
            self.variants.insert(-1, DISK)
        if extras:
            self.memories[REPLAY] = MemoryWrapper(
                self.model, num_samples, (3, 32, 32), eps=EPS, replay_fraction=0.5
            )
            self.memories[STARTED] = MemoryWrapper(
                self.model, num_samples, (3, 32, 32), eps=EPS, beta_prime=0.0
            )
            self.variants[-1:-1] = [REPLAY, *(f"started k{k}" for k in STARTED_STEPS)]
        with torch.no_grad():  # fill every slot, so that every timed call reads depth x B rows
            for key, memory in self.memories.items():
                for _ in range(int(key) if isinstance(key, int) else 1):
                    for first in range(0, num_samples, batch):
                        idx = torch.arange(first, first + batch)
                        x = self.x[idx]
                        adv = (x + EPS * torch.randn_like(x).sign()).clamp(0, 1)
                        logits = self.model(x)
                        memory(idx, x, adv, logits, self.y[idx], adv_logits=logits, write=True)
                assert memory.stats()["filled_fraction"] == 1.0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.position + self.batch > self.order.shape[0]:
            self.position = 0
        idx = self.order[self.position : self.position + self.batch]
        self.position += self.batch
        return self.x[idx], self.y[idx], idx

    def step(self, variant: str) -> None:
        """One training step of ``variant``: "base", "floor", "memory dK" or "memory d1 disk"."""
        x, y, idx = self.next_batch()
        if variant.startswith("started k"):
            started = self.memories[STARTED]
            start, found = started.recall(idx, x)
            start = torch.where(found.view(-1, 1, 1, 1), start, uniform_start(x, EPS))
            steps = int(variant.removeprefix("started k"))
            kwargs = {**self.kwargs, "steps": steps, "step_size": max(EPS / steps, EPS / 4)}
            out = self.objective(self.model, x, y, **kwargs, init=start)
            loss = out.loss + started(idx, x, out.adv, out.logits, y, adv_logits=out.adv_logits)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            return
        out = self.objective(self.model, x, y, **self.kwargs)
        loss = out.loss
        if variant == "floor":
            extra = F.cross_entropy(self.model(out.adv.detach()), y)
            loss = loss + 1e-3 * (extra + F.cross_entropy(out.logits, y))
        elif variant in (DISK, REPLAY):
            memory = self.memories[variant]
            loss = loss + memory(idx, x, out.adv, out.logits, y, adv_logits=out.adv_logits)
        elif variant.startswith("memory d"):
            memory = self.memories[int(variant.removeprefix("memory d"))]
            loss = loss + memory(idx, x, out.adv, out.logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def timed(fn: Callable[[], None]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one call."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def balanced_batch(
    rank: int, world_size: int, batch: int, num_samples: int, generator: torch.Generator
) -> torch.Tensor:
    """Rank ``rank``'s part of one global batch: ``batch / world_size`` samples of each owner.

    A sharded memory stores sample ``i`` on rank ``i % world_size``; a batch balanced over the
    owners makes every step exchange the same number of rows. Every rank draws the same
    permutations (same generator state) and takes its own slice.
    """
    per_owner = batch // world_size
    parts = []
    for owner in range(world_size):
        owned = torch.arange(owner, num_samples, world_size)
        order = owned[torch.randperm(owned.numel(), generator=generator)]
        parts.append(order[rank * per_owner : (rank + 1) * per_owner])
    return torch.cat(parts)


def expected_comm_bytes(layout: str, *, batch: int, world_size: int, row_bytes: int) -> int:
    """Bytes a rank receives in one memory call with balanced batches of distinct indices.

    Every call all-gathers a 2 x int64 header, the batch's int64 indices and one uint8
    acceptance flag per row. Rows: sharded, the ``batch (ws - 1) / ws`` rows of this rank's batch
    that other ranks own (read) plus the ``batch (ws - 1) / ws`` rows of other ranks' batches that
    this rank owns (write); replicated, every other rank's ``batch`` new rows.
    """
    others = world_size - 1
    bookkeeping = others * (2 * 8 + batch * 8 + batch)
    if layout == "sharded":
        rows = 2 * batch * others // world_size
    else:
        rows = batch * others
    return bookkeeping + rows * row_bytes


def distributed_worker(rank: int, config: dict[str, Any], folder: str) -> None:
    """One rank of the distributed section; writes its raw times to ``folder/rank<r>.json``."""
    torch.set_num_threads(1)
    world_size, batch = config["world_size"], config["batch"]
    dist.init_process_group(
        "gloo",
        init_method=f"file://{folder}/init",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=300),
    )
    try:
        torch.manual_seed(0)
        model = DistributedDataParallel(SmallResNet(widths=tuple(config["widths"])))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        num_samples = 4 * batch * world_size
        data = torch.Generator().manual_seed(1)
        x_all = torch.rand(num_samples, 3, 32, 32, generator=data)
        y_all = torch.randint(0, 10, (num_samples,), generator=data)
        memories = {
            layout: MemoryWrapper(
                model, num_samples, (3, 32, 32), depth=1, eps=EPS, distributed=layout
            )
            for layout in LAYOUTS
        }
        with torch.no_grad():  # fill every slot: each global batch covers batch / ws per owner
            per_owner = batch // world_size
            for memory in memories.values():
                for first in range(0, num_samples // world_size, per_owner * world_size):
                    slot = first + rank * per_owner
                    idx = torch.cat(
                        [
                            torch.arange(owner, num_samples, world_size)[slot : slot + per_owner]
                            for owner in range(world_size)
                        ]
                    )
                    x = x_all[idx]
                    adv = (x + EPS * torch.randn_like(x).sign()).clamp(0, 1)
                    memory(idx, x, adv, model(x), y_all[idx], write=True)
                assert memory.stats()["filled_fraction"] == 1.0
        objective, kwargs = method_table(config["steps"])[config["method"]]
        variants = ["base", *LAYOUTS]
        wall: dict[str, list[float]] = {v: [] for v in variants}
        cpu: dict[str, list[float]] = {v: [] for v in variants}
        comm: dict[str, list[int]] = {v: [] for v in LAYOUTS}
        batches = torch.Generator().manual_seed(2)  # the same draws on every rank
        for rep in range(config["reps"] + 1):
            shift = rep % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                idx = balanced_batch(rank, world_size, batch, num_samples, batches)
                x, y = x_all[idx], y_all[idx]
                dist.barrier()
                cpu_start, wall_start = time.process_time(), time.perf_counter()
                out = objective(model, x, y, **kwargs)
                loss = out.loss
                if variant in memories:
                    loss = loss + memories[variant](idx, x, out.adv, out.logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                wall_s = time.perf_counter() - wall_start
                cpu_s = time.process_time() - cpu_start
                if rep > 0:  # repetition 0 warms up
                    wall[variant].append(wall_s)
                    cpu[variant].append(cpu_s)
                    if variant in memories:
                        comm[variant].append(memories[variant].stats()["comm_bytes_last_step"])
        result = {"wall_seconds": wall, "cpu_seconds": cpu, "comm_bytes": comm}
        Path(folder, f"rank{rank}.json").write_text(json.dumps(result))
        # Without this a rank can tear down its gloo threads while its peer is still in the last
        # collective, which aborts the process ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(
    *, method: str, steps: int, batch: int, widths: tuple[int, int, int], reps: int
) -> dict[str, Any]:
    """Spawns the ranks and returns their raw times and received bytes, one list per rank."""
    config = {
        "world_size": WORLD_SIZE,
        "method": method,
        "steps": steps,
        "batch": batch,
        "widths": list(widths),
        "reps": reps,
    }
    with tempfile.TemporaryDirectory() as folder:
        # Results travel through files: tensors sent through queues die with their process.
        mp.spawn(distributed_worker, args=(config, folder), nprocs=WORLD_SIZE, join=True)
        ranks = [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    return {
        "world_size": WORLD_SIZE,
        "method": method,
        "batch_per_rank": batch,
        "reps": reps,
        "clock": "wall (perf_counter), barrier before each step",
        "wall_seconds": [r["wall_seconds"] for r in ranks],
        "cpu_seconds": [r["cpu_seconds"] for r in ranks],
        "comm_bytes": [r["comm_bytes"] for r in ranks],
    }


def summarize_distributed(result: dict[str, Any], single: dict[str, Any], *, batch: int) -> None:
    """Adds the medians, ratios and expected bytes to ``result`` and prints them."""
    world_size = result["world_size"]
    variants = ["base", *LAYOUTS]
    # A step lasts until its slower rank is done.
    slower = {
        v: [max(times) for times in zip(*(r[v] for r in result["wall_seconds"]), strict=True)]
        for v in variants
    }
    step_ms = {v: 1e3 * statistics.median(slower[v]) for v in variants}
    per_rank_ms = [
        {v: 1e3 * statistics.median(r[v]) for v in variants} for r in result["wall_seconds"]
    ]
    row_bytes = 3 * 32 * 32 * torch.finfo(torch.float32).bits // 8
    expected = {
        layout: expected_comm_bytes(layout, batch=batch, world_size=world_size, row_bytes=row_bytes)
        for layout in LAYOUTS
    }
    single_d1 = single["wall_median_ms"]["memory d1"]
    result.update(
        {
            "step_ms": step_ms,
            "per_rank_step_ms": per_rank_ms,
            "ratio_to_base": {v: step_ms[v] / step_ms["base"] for v in variants},
            "single_process_wall_ms": {
                "base": single["wall_median_ms"]["base"],
                "memory d1": single_d1,
            },
            "over_single_process_d1": {v: step_ms[v] / single_d1 for v in variants},
            "expected_comm_bytes": expected,
        }
    )
    print(
        f"{'variant':>12s} {'step ms':>9s} {'rank ms':>17s} {'/ base':>7s} {'/ 1-proc d1':>11s} "
        f"{'bytes/step':>11s} {'expected':>9s}"
    )
    for v in variants:
        ranks = "/".join(f"{r[v]:.0f}" for r in per_rank_ms)
        measured = sorted({b for r in result["comm_bytes"] for b in r.get(v, [])})
        shown = ",".join(str(b) for b in measured) if measured else "-"
        print(
            f"{v:>12s} {step_ms[v]:9.1f} {ranks:>17s} {result['ratio_to_base'][v]:7.3f} "
            f"{result['over_single_process_d1'][v]:11.3f} {shown:>11s} "
            f"{expected.get(v, '-')!s:>9s}"
        )
    print(
        f"single process (main table, wall): base {single['wall_median_ms']['base']:.1f} ms, "
        f"depth 1 {single_d1:.1f} ms; rows of {row_bytes} bytes, "
        f"{batch * (world_size - 1)} rows of other ranks' batches per step"
    )


# -- focused mode: one model, chosen methods and memory placements, on any device ----------------

FOCUSED_MEMORY_TARGET = 1.08
"""Focused mode: a step with a depth-1 memory at most this many times the base step."""
FOCUSED_PINNED_TARGET = 1.01
"""Focused mode: the ``pinned-fp16`` step at most this many times the ``gpu-fp32`` step."""
METHOD_LABELS = {
    "trades": "TRADES",
    "pgd_at": "PGD-AT",
    "mart": "MART",
    "hat": "HAT",
    "squeeze": "ST",
    "single_step": "single-step",
}
MEM_PLACEMENTS = ("cpu", "pinned", "gpu")
MEM_DTYPES = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "uint8": torch.uint8,
}


def parse_mem_config(text: str) -> tuple[str, torch.dtype]:
    """``"pinned-fp16"`` -> ``("pinned", torch.float16)``."""
    placement, _, dtype = text.partition("-")
    if placement not in MEM_PLACEMENTS or dtype not in MEM_DTYPES:
        raise argparse.ArgumentTypeError(
            f"--mem-configs takes PLACEMENT-DTYPE with placement in {MEM_PLACEMENTS} and dtype in "
            f"{tuple(MEM_DTYPES)}, got {text!r}"
        )
    return placement, MEM_DTYPES[dtype]


def mem_config(text: str) -> str:
    """``--mem-configs`` entries, checked by :func:`parse_mem_config` (a usage error if bad)."""
    parse_mem_config(text)
    return text


def focused_model(name: str, *, smoke: bool, widths: tuple[int, int, int]) -> torch.nn.Module:
    """The model of focused mode: SmallResNet, or a paper-scale architecture without input
    normalization (tiny widths with ``--smoke``)."""
    if name == "small-resnet":
        return SmallResNet(widths=widths)
    from memloss_addon.experiments.models import build_model

    tiny: dict[str, int] = {}
    if smoke:
        tiny = {"widen_factor": 1} if name.startswith("wrn-") else {"base_width": 4}
    return build_model(
        name,  # type: ignore[arg-type]
        sample_shape=(3, 32, 32),
        num_classes=10,
        normalization="identity",
        **tiny,
    )


class FocusedBench:
    """One method on one device: model, optimizer, data there, and one memory per config."""

    def __init__(
        self,
        objective: Callable[..., Any],
        kwargs: dict[str, Any],
        *,
        model_fn: Callable[[], torch.nn.Module],
        batch: int,
        device: torch.device,
        mem_configs: list[str],
        seed: int,
        amp: bool = False,
        channels_last: bool = False,
    ) -> None:
        torch.manual_seed(seed)
        self.device, self.amp, self.channels_last = device, amp, channels_last
        self.objective = objective
        self.kwargs = dict(kwargs)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model_fn().to(device=device, memory_format=fmt)
        if objective is objectives.hat:  # HAT's frozen helper model
            helper = model_fn().to(device=device, memory_format=fmt).eval()
            for p in helper.parameters():
                p.requires_grad_(False)
            self.kwargs["helper"] = helper
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.batch = batch
        num_samples = 4 * batch
        self.x = torch.rand(num_samples, 3, 32, 32, device=device)
        self.y = torch.randint(0, 10, (num_samples,), device=device)
        self.order = torch.randperm(num_samples, device=device)
        self.position = 0
        self.memories: dict[str, MemoryWrapper] = {}
        for name in mem_configs:
            placement, dtype = parse_mem_config(name)
            self.memories[name] = MemoryWrapper(
                self.model,
                num_samples,
                (3, 32, 32),
                depth=1,
                eps=EPS,
                dtype=dtype,
                device=device if placement == "gpu" else "cpu",
                pin_memory=placement == "pinned",
            )
        self.variants = ["base", *(f"memory {name}" for name in mem_configs)]
        with torch.no_grad():  # fill every slot: every timed call reads B rows
            for memory in self.memories.values():
                for first in range(0, num_samples, batch):
                    idx = torch.arange(first, first + batch, device=device)
                    x = self.x[idx]
                    adv = (x + EPS * torch.randn_like(x).sign()).clamp(0, 1)
                    logits = self.model(x)
                    memory(idx, x, adv, logits, self.y[idx], adv_logits=logits, write=True)
                assert memory.stats()["filled_fraction"] == 1.0

    def step(self, variant: str) -> None:
        if self.position + self.batch > self.order.shape[0]:
            self.position = 0
        idx = self.order[self.position : self.position + self.batch]
        self.position += self.batch
        x, y = self.x[idx], self.y[idx]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.objective(self.model, x, y, **self.kwargs)
            loss = out.loss
            if variant != "base":
                memory = self.memories[variant.removeprefix("memory ")]
                loss = loss + memory(idx, x, out.adv, out.logits, y, adv_logits=out.adv_logits)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def synchronized_wall(device: torch.device, fn: Callable[[], None]) -> float:
    """Wall seconds of one call, the device synchronised before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def focused_main(args: argparse.Namespace) -> int:
    """Focused mode (see the module docstring)."""
    device = torch.device(args.device)
    mem_configs = list(dict.fromkeys(args.mem_configs or ["cpu-fp32"]))
    for name in mem_configs:
        placement, _ = parse_mem_config(name)
        if placement != "cpu" and device.type != "cuda":
            print(f"step_overhead: --mem-configs {name} needs --device cuda", file=sys.stderr)
            return 2
    if args.smoke:
        steps, batch, widths, reps = 2, 8, (4, 4, 4), 1
    else:
        steps, batch, widths, reps = args.steps, args.batch, (16, 32, 64), args.reps
    methods = args.methods or list(METHOD_LABELS)
    table = method_table(steps)
    labels = {m: METHOD_LABELS[m] + ("" if m == "single_step" else f"-{steps}") for m in methods}
    meta = run_metadata([sys.executable, *sys.argv])
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
    print_metadata(meta)
    print(
        f"{args.model} on {device}, batch {batch}, 3x32x32 random data, eps 8/255, SGD"
        + (", bf16 autocast" if args.amp == "bf16" else "")
        + (", channels_last" if args.channels_last else "")
        + f"; depth-1 memories {', '.join(mem_configs)}; {reps} repetitions after one warm-up, "
        "variants interleaved in rotating order; medians of per-step wall time, the device "
        "synchronised around each step.",
        flush=True,
    )
    benches = {
        label: FocusedBench(
            *table[label],
            model_fn=lambda: focused_model(args.model, smoke=args.smoke, widths=widths),
            batch=batch,
            device=device,
            mem_configs=mem_configs,
            seed=i,
            amp=args.amp == "bf16",
            channels_last=args.channels_last,
        )
        for i, label in enumerate(labels.values())
    }
    wall = {m: {v: [] for v in b.variants} for m, b in benches.items()}
    for rep in range(reps + 1):
        for label, bench in benches.items():
            variants = bench.variants
            shift = rep % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                seconds = synchronized_wall(device, lambda b=bench, v=variant: b.step(v))
                if rep > 0:  # repetition 0 warms up
                    wall[label][variant].append(seconds)
    rows = []
    print(f"\n{'method':>12s} {'variant':>20s} {'median ms':>10s} {'/ base':>8s}  target")
    for label, times in wall.items():
        median_ms = {v: 1e3 * statistics.median(t) for v, t in times.items()}
        ratio = {v: ms / median_ms["base"] for v, ms in median_ms.items()}
        row: dict[str, Any] = {
            "method": label,
            "median_ms": median_ms,
            "ratio": ratio,
            "memory_target": FOCUSED_MEMORY_TARGET,
            "memory_passed": {
                v: r <= FOCUSED_MEMORY_TARGET for v, r in ratio.items() if v != "base"
            },
        }
        pinned, gpu = median_ms.get("memory pinned-fp16"), median_ms.get("memory gpu-fp32")
        if pinned is not None and gpu is not None:
            row["pinned_fp16_over_gpu_fp32"] = pinned / gpu
            row["pinned_target"] = FOCUSED_PINNED_TARGET
            row["pinned_passed"] = pinned / gpu <= FOCUSED_PINNED_TARGET
        rows.append(row)
        for variant, ms in median_ms.items():
            verdict = ""
            if variant != "base":
                passed = row["memory_passed"][variant]
                verdict = f"<= {FOCUSED_MEMORY_TARGET:.2f} " + ("PASS" if passed else "FAIL")
            print(f"{label:>12s} {variant:>20s} {ms:10.2f} {ratio[variant]:8.3f}  {verdict}")
        if "pinned_fp16_over_gpu_fp32" in row:
            print(
                f"{label:>12s} pinned-CPU fp16 memory / GPU fp32 memory: "
                f"{row['pinned_fp16_over_gpu_fp32']:.4f} (target <= {FOCUSED_PINNED_TARGET:.2f}: "
                + ("PASS" if row["pinned_passed"] else "FAIL")
                + ")"
            )
    if args.json is not None:
        write_json(
            args.json,
            {
                "meta": meta,
                "settings": {
                    "mode": "focused",
                    "model": args.model,
                    "device": str(device),
                    "batch": batch,
                    "steps": steps,
                    "reps": reps,
                    "amp": args.amp,
                    "channels_last": args.channels_last,
                    "mem_configs": mem_configs,
                },
                "rows": rows,
                "wall_seconds": wall,
            },
        )
        print(f"\nwrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, one repetition")
    parser.add_argument("--json", default=None, help="where to write the results as JSON")
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions (default 7)")
    parser.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    focused = parser.add_argument_group("focused mode (any of these options selects it)")
    focused.add_argument(
        "--model",
        default=None,
        choices=("small-resnet", "resnet18", "preact-resnet18", "wrn-34-10", "wrn-28-10"),
        help="the model (default: small-resnet)",
    )
    focused.add_argument("--device", default=None, help="torch device (default: cpu)")
    focused.add_argument(
        "--methods", nargs="+", choices=tuple(METHOD_LABELS), default=None, help="default: all"
    )
    focused.add_argument(
        "--mem-configs",
        nargs="+",
        type=mem_config,
        default=None,
        metavar="PLACEMENT-DTYPE",
        help="memories to time, e.g. pinned-fp16 gpu-fp32 (default: cpu-fp32)",
    )
    focused.add_argument("--amp", choices=("off", "bf16"), default=None, help="default: off")
    focused.add_argument("--channels-last", action="store_true", default=None)
    focused.add_argument("--steps", type=int, default=10, help="attack steps (default 10)")
    args = parser.parse_args(argv)
    if any(
        getattr(args, name) is not None
        for name in ("model", "device", "methods", "mem_configs", "amp", "channels_last")
    ):
        args.model = args.model or "small-resnet"
        args.device = args.device or "cpu"
        args.amp = args.amp or "off"
        args.channels_last = bool(args.channels_last)
        return focused_main(args)
    if args.smoke:
        steps, batch, widths, reps = 2, 8, (4, 4, 4), 1
    else:
        steps, batch, widths, reps = 10, args.batch, (16, 32, 64), args.reps
    json_path = args.json or (None if args.smoke else RESULTS_DIR / "step_overhead.json")

    meta = run_metadata([sys.executable, *sys.argv])
    print_metadata(meta)
    print(
        f"SmallResNet{widths}, batch {batch}, 3x32x32 random data, eps 8/255, SGD; {reps} "
        f"repetitions after one warm-up, variants interleaved in rotating order; medians of "
        f"per-step process CPU time (wall-clock medians in the last column)."
    )
    disk_folder = tempfile.TemporaryDirectory()
    target_label = f"TRADES-{steps}"
    benches = {
        label: StepBench(
            objective,
            kwargs,
            batch=batch,
            widths=widths,
            seed=i,
            storage_path=disk_folder.name if label == target_label else None,
            extras=label == target_label,
        )
        for i, (label, (objective, kwargs)) in enumerate(method_table(steps).items())
    }
    cpu = {m: {v: [] for v in b.variants} for m, b in benches.items()}
    wall = {m: {v: [] for v in b.variants} for m, b in benches.items()}
    for rep in range(reps + 1):
        for label, bench in benches.items():
            variants = bench.variants
            shift = rep % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                cpu_s, wall_s = timed(lambda b=bench, v=variant: b.step(v))
                if rep > 0:  # repetition 0 warms up
                    cpu[label][variant].append(cpu_s)
                    wall[label][variant].append(wall_s)
        print(f"  repetition {rep}/{reps} done", flush=True)
    benches.clear()  # close the disk-backed memory before its folder goes
    disk_folder.cleanup()

    rows = []
    header = (
        f"{'method':>12s} {'base ms':>9s} "
        + " ".join(f"{'d' + str(d) + ' ratio':>9s}" for d in DEPTHS)
        + f" {'floor':>7s} {'d1 - floor ms':>13s} {'d1 wall ratio':>13s}  target"
    )
    print("\n" + header)
    for label in cpu:
        median = {v: statistics.median(times) for v, times in cpu[label].items()}
        wall_median = {v: statistics.median(times) for v, times in wall[label].items()}
        ratios = {v: median[v] / median["base"] for v in median}
        target = TARGET[1] if label == TARGET[0] else None
        row = {
            "method": label,
            "base_ms": 1e3 * median["base"],
            "median_ms": {v: 1e3 * t for v, t in median.items()},
            "wall_median_ms": {v: 1e3 * t for v, t in wall_median.items()},
            "ratio": ratios,
            "wall_ratio_d1": wall_median["memory d1"] / wall_median["base"],
            "target": target,
            "passed": None if target is None else ratios["memory d1"] <= target,
        }
        if DISK in median:
            row["wall_ratio_disk"] = wall_median[DISK] / wall_median["base"]
        rows.append(row)
        verdict = (
            "" if target is None else f"<= {target:.2f} " + ("PASS" if row["passed"] else "FAIL")
        )
        print(
            f"{label:>12s} {row['base_ms']:9.1f} "
            + " ".join(f"{ratios[f'memory d{d}']:9.3f}" for d in DEPTHS)
            + f" {ratios['floor']:7.3f}"
            f" {1e3 * (median['memory d1'] - median['floor']):13.1f}"
            f" {row['wall_ratio_d1']:13.3f}  {verdict}"
        )
    for row in rows:
        if REPLAY in row["ratio"]:
            replay = row["ratio"][REPLAY]
            verdict = "PASS" if replay <= REPLAY_TARGET else "FAIL"
            row["replay_target"], row["replay_passed"] = REPLAY_TARGET, replay <= REPLAY_TARGET
            started = ", ".join(
                f"{k} step(s) {row['ratio'][f'started k{k}']:.3f}" for k in STARTED_STEPS
            )
            print(
                f"{row['method']:>12s} replay fraction 0.5: {replay:.3f} x base "
                f"(target <= {REPLAY_TARGET:.2f}: {verdict}); memory-started attacks, no term: "
                f"{started} x base"
            )
        if DISK in row["ratio"]:
            print(
                f"{row['method']:>12s} depth 1 on disk (storage_path): {row['ratio'][DISK]:.3f} x "
                f"base CPU time, {row['wall_ratio_disk']:.3f} x base wall time "
                f"(in RAM: {row['ratio']['memory d1']:.3f} and {row['wall_ratio_d1']:.3f})"
            )

    print(
        f"\n{target_label} in {WORLD_SIZE} gloo processes, DistributedDataParallel, batch {batch} "
        f"per rank, depth-1 memories; {reps} repetitions after one warm-up, rotating order; wall "
        f"time per step after a barrier, of the slower rank; medians.",
        flush=True,
    )
    distributed = run_distributed(
        method=target_label, steps=steps, batch=batch, widths=widths, reps=reps
    )
    summarize_distributed(distributed, rows[0], batch=batch)
    if json_path is not None:
        write_json(
            json_path,
            {
                "meta": meta,
                "settings": {"batch": batch, "widths": widths, "steps": steps, "reps": reps},
                "rows": rows,
                "cpu_seconds": cpu,
                "wall_seconds": wall,
                "distributed": distributed,
            },
        )
        print(f"\nwrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
