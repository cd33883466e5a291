"""Does aligning the memory with the augmentation change MemLoss's effect? Digits, 5 seeds, paired.

Usage:
    python benchmarks/alignment.py [--smoke] [--seeds N] [--epochs E] [--out DIR]

scikit-learn's handwritten digits (1,437 training and 360 test images), each training batch
augmented by a random shift: the 8x8 image is padded by one pixel and a random 8x8 crop taken
(``memloss_addon.views.crop_flip``; no flips, digits are not mirror-symmetric). TRADES (10 steps,
eps 0.1, step 0.025, beta 6) trains the default digits MLP with SGD (lr 0.05, momentum 0.9,
weight decay 2e-4, x0.1 at 50% and 75% of the epochs), three arms paired by seed (same
initialisation, data order, shifts and attack starts):

- ``TRADES``: no memory;
- ``+MemLoss``: ``mode="perturbation"`` (beta' 2, K 1), the stored perturbation replayed on the
  current view as it is, hence shifted by the difference of the two crops;
- ``+MemLoss, aligned``: the same with ``view_padding=1``, the perturbation kept in the padded
  frame and replayed on the same pixels.

Clean and PGD-20 accuracy on the 360 test digits (no AutoAttack: cut to keep the run to minutes).
Results are appended to ``alignment_runs.jsonl`` as runs finish (an interrupted run resumes),
then summarised in ``alignment.json`` with paired differences (mean and sample std over seeds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import RESULTS_DIR, print_metadata, run_metadata, write_json

from memloss_addon import MemoryWrapper
from memloss_addon.experiments.attacks import pgd_linf
from memloss_addon.experiments.datasets import load_digits
from memloss_addon.experiments.models import build_model
from memloss_addon.objectives import trades
from memloss_addon.views import crop_flip

ARMS = ("TRADES", "+MemLoss", "+MemLoss, aligned")
EPS, STEP, STEPS, BETA, PAD = 0.1, 0.025, 10, 6.0, 1


def tensors(dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([item[0] for item in items]), torch.tensor([int(item[1]) for item in items])


def train_and_evaluate(arm: str, seed: int, epochs: int, batch: int = 128) -> dict[str, Any]:
    splits = load_digits()
    x_train, y_train = tensors(splits.train)
    x_test, y_test = tensors(splits.test)
    padded = torch.nn.functional.pad(x_train, (PAD, PAD, PAD, PAD))
    torch.manual_seed(seed)
    model = build_model("digits-mlp", sample_shape=(1, 8, 8), num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=2e-4)
    steps_per_epoch = -(-len(x_train) // batch)
    milestones = [int(0.5 * epochs * steps_per_epoch), int(0.75 * epochs * steps_per_epoch)]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    memory = None
    if arm != "TRADES":
        aligned = arm.endswith("aligned")
        memory = MemoryWrapper(
            model,
            len(x_train),
            (1, 8, 8),
            mode="perturbation",
            eps=EPS,
            view_padding=PAD if aligned else None,
        )
    data = torch.Generator().manual_seed(1000 + seed)
    start = time.process_time()
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=data)
        for first in range(0, len(x_train), batch):
            idx = order[first : first + batch]
            offsets = torch.randint(0, 2 * PAD + 1, (len(idx), 2), generator=data)
            flips = torch.zeros(len(idx), dtype=torch.bool)
            x = crop_flip(padded[idx], offsets, flips, (8, 8))
            y = y_train[idx]
            out = trades(model, x, y, eps=EPS, step_size=STEP, steps=STEPS, beta=BETA)
            loss = out.loss
            if memory is not None:
                view = (offsets, flips) if memory.view_padding else None
                loss = loss + memory(idx, x, out.adv, out.logits, y, view=view)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    seconds = time.process_time() - start
    model.eval()
    with torch.no_grad():
        clean = float((model(x_test).argmax(1) == y_test).float().mean())
    generator = torch.Generator().manual_seed(7)
    adv = pgd_linf(
        model, x_test, y_test, eps=EPS, step_size=2.5 * EPS / 20, steps=20, generator=generator
    )
    with torch.no_grad():
        robust = float((model(adv).argmax(1) == y_test).float().mean())
    return {"arm": arm, "seed": seed, "clean": clean, "pgd20": robust, "train_cpu_s": seconds}


def paired(runs: list[dict[str, Any]], arm: str, reference: str, metric: str) -> dict[str, Any]:
    by_seed = {(r["arm"], r["seed"]): r[metric] for r in runs}
    seeds = sorted(s for a, s in by_seed if a == arm and (reference, s) in by_seed)
    diffs = [by_seed[(arm, s)] - by_seed[(reference, s)] for s in seeds]
    return {
        "seeds": seeds,
        "differences": diffs,
        "mean": statistics.fmean(diffs) if diffs else None,
        "std": statistics.stdev(diffs) if len(diffs) > 1 else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="1 seed, 1 epoch (for tests)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    seeds, epochs = (1, 1) if args.smoke else (args.seeds, args.epochs)
    torch.set_num_threads(1)
    meta = run_metadata([sys.executable, *sys.argv])
    print_metadata(meta)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "alignment_runs.jsonl"
    runs = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    done = {(r["arm"], r["seed"], r["epochs"]) for r in runs}
    for seed in range(seeds):
        for arm in ARMS:
            if (arm, seed, epochs) in done:
                continue
            result = {**train_and_evaluate(arm, seed, epochs), "epochs": epochs}
            runs.append(result)
            with log.open("a") as file:
                file.write(json.dumps(result) + "\n")
            print(
                f"{arm:>20s} seed {seed}: clean {result['clean']:.4f} PGD-20 "
                f"{result['pgd20']:.4f} ({result['train_cpu_s']:.1f} CPU s)",
                flush=True,
            )
    runs = [r for r in runs if r["epochs"] == epochs and r["seed"] < seeds]
    comparisons = {
        f"{arm} - {reference}": {
            metric: paired(runs, arm, reference, metric) for metric in ("clean", "pgd20")
        }
        for arm, reference in (
            ("+MemLoss", "TRADES"),
            ("+MemLoss, aligned", "TRADES"),
            ("+MemLoss, aligned", "+MemLoss"),
        )
    }
    print(f"\npaired differences over {seeds} seed(s), {epochs} epochs (percentage points):")
    for name, metrics in comparisons.items():
        cells = []
        for metric, entry in metrics.items():
            spread = "" if entry["std"] is None else f" ± {100 * entry['std']:.2f}"
            cells.append(f"{metric} {100 * entry['mean']:+.2f}{spread}")
        print(f"  {name:>30s}: " + ", ".join(cells))
    write_json(
        args.out / "alignment.json",
        {"meta": meta, "epochs": epochs, "seeds": seeds, "runs": runs, "paired": comparisons},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
