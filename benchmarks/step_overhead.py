"""Time of one adversarial training step with MemLoss divided by the same step without it.

Usage:
    python benchmarks/step_overhead.py [--smoke] [--json PATH] [--reps N] [--batch B]

For each base method (TRADES-10, PGD-AT-10, MART-10, HAT-10, ST-10 and single-step), one model
(``memloss_addon.models.SmallResNet``, about 0.2M parameters) trains on random 3x32x32 data with
SGD, and these steps are timed interleaved, in a rotating order, in every repetition:

- ``base``: the reference objective, ``backward()`` and an optimizer step;
- ``memory dK``: the same plus a ``MemoryWrapper`` call of depth K = 1, 2, 4 whose slots are all
  filled, so every call runs the memory forward pass on K x B stored examples;
- ``floor``: the base step plus one extra forward and backward pass of the batch (a small
  cross-entropy on this step's adversarial examples) and a gradient through the clean logits
  (a small cross-entropy on them): the least a depth-1 memory can cost, since the MemLoss term
  runs the model on B stored examples and its gradient flows through both its KL arguments.
  For TRADES, MART, HAT and ST the clean logits are in the base loss already; PGD-AT and
  single-step compute them in an extra forward pass that the base loss does not backpropagate.

Times are medians over the repetitions of each step's CPU time (``time.process_time``: this
process's CPU time, which leaves out time spent waiting for other processes on a shared machine);
wall-clock medians are reported next to them. Seeds are fixed. The target: TRADES-10 with a
depth-1 memory at most 1.10 x the base step. ``--smoke`` runs a tiny model on batches of 8 with
2 attack steps and one repetition (for tests).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from _common import RESULTS_DIR, print_metadata, run_metadata, write_json

from memloss_addon import MemoryWrapper, objectives
from memloss_addon.models import SmallResNet

EPS = 8 / 255
TARGET = ("TRADES-10", 1.10)
DEPTHS = (1, 2, 4)


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
        self.memories = {
            depth: MemoryWrapper(self.model, num_samples, (3, 32, 32), depth=depth, eps=EPS)
            for depth in DEPTHS
        }
        with torch.no_grad():  # fill every slot, so that every timed call reads depth x B rows
            for depth, memory in self.memories.items():
                for _ in range(depth):
                    for first in range(0, num_samples, batch):
                        idx = torch.arange(first, first + batch)
                        x = self.x[idx]
                        adv = (x + EPS * torch.randn_like(x).sign()).clamp(0, 1)
                        memory(idx, x, adv, self.model(x), self.y[idx])
                assert memory.stats()["filled_fraction"] == 1.0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.position + self.batch > self.order.shape[0]:
            self.position = 0
        idx = self.order[self.position : self.position + self.batch]
        self.position += self.batch
        return self.x[idx], self.y[idx], idx

    def step(self, variant: str) -> None:
        """One training step of ``variant``: "base", "floor" or "memory dK"."""
        x, y, idx = self.next_batch()
        out = self.objective(self.model, x, y, **self.kwargs)
        loss = out.loss
        if variant == "floor":
            extra = F.cross_entropy(self.model(out.adv.detach()), y)
            loss = loss + 1e-3 * (extra + F.cross_entropy(out.logits, y))
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, one repetition")
    parser.add_argument("--json", default=None, help="where to write the results as JSON")
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions (default 7)")
    parser.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    args = parser.parse_args(argv)
    if args.smoke:
        steps, batch, widths, reps = 2, 8, (4, 4, 4), 1
    else:
        steps, batch, widths, reps = 10, args.batch, (16, 32, 64), args.reps
    json_path = args.json or (None if args.smoke else RESULTS_DIR / "step_overhead.json")
    variants = ["base", *(f"memory d{d}" for d in DEPTHS), "floor"]

    meta = run_metadata([sys.executable, *sys.argv])
    print_metadata(meta)
    print(
        f"SmallResNet{widths}, batch {batch}, 3x32x32 random data, eps 8/255, SGD; {reps} "
        f"repetitions after one warm-up, variants interleaved in rotating order; medians of "
        f"per-step process CPU time (wall-clock medians in the last column)."
    )
    benches = {
        label: StepBench(objective, kwargs, batch=batch, widths=widths, seed=i)
        for i, (label, (objective, kwargs)) in enumerate(method_table(steps).items())
    }
    cpu: dict[str, dict[str, list[float]]] = {m: {v: [] for v in variants} for m in benches}
    wall: dict[str, dict[str, list[float]]] = {m: {v: [] for v in variants} for m in benches}
    for rep in range(reps + 1):
        for label, bench in benches.items():
            shift = rep % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                cpu_s, wall_s = timed(lambda b=bench, v=variant: b.step(v))
                if rep > 0:  # repetition 0 warms up
                    cpu[label][variant].append(cpu_s)
                    wall[label][variant].append(wall_s)
        print(f"  repetition {rep}/{reps} done", flush=True)

    rows = []
    header = (
        f"{'method':>12s} {'base ms':>9s} "
        + " ".join(f"{'d' + str(d) + ' ratio':>9s}" for d in DEPTHS)
        + f" {'floor':>7s} {'d1 - floor ms':>13s} {'d1 wall ratio':>13s}  target"
    )
    print("\n" + header)
    for label in benches:
        median = {v: statistics.median(cpu[label][v]) for v in variants}
        wall_median = {v: statistics.median(wall[label][v]) for v in variants}
        ratios = {v: median[v] / median["base"] for v in variants}
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
    if json_path is not None:
        write_json(
            json_path,
            {
                "meta": meta,
                "settings": {"batch": batch, "widths": widths, "steps": steps, "reps": reps},
                "rows": rows,
                "cpu_seconds": cpu,
                "wall_seconds": wall,
            },
        )
        print(f"\nwrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
