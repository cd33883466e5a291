"""A MemLoss training run with a disk-backed memory that checkpoints every epoch and resumes.

Run as a script by ``tests/test_disk_resume.py``, which kills it with SIGKILL mid-epoch::

    python tests/resumable_disk_training.py RUN_FOLDER [--kill-after STEP] [--no-rollback]

The memory lives in ``RUN_FOLDER/memory`` and is never saved whole: after each checkpoint
(model, optimizer, RNG state, epoch, loss history and ``memory.step``, written atomically) the
run calls ``memory.mark_checkpoint()``. On resume it reopens the folder, which is then ahead of
the checkpoint by the steps done since, and calls ``memory.rollback_to(checkpoint step)``
(``--no-rollback`` skips that, to show what it prevents). The warnings the reopened memory gives
are written to ``warnings.json``. At the end it writes ``final.pt`` and ``final-memory.bin``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import warnings
from pathlib import Path

import torch
from torch import nn

from memloss_addon import MemoryWrapper
from memloss_addon.objectives import pgd_at
from memloss_addon.store.files import atomic_write

NUM_SAMPLES, FEATURES, CLASSES = 24, 6, 3
BATCH, EPOCHS = 6, 4
STEPS_PER_EPOCH = NUM_SAMPLES // BATCH


def dataset() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(NUM_SAMPLES, FEATURES, generator=generator)
    y = torch.randint(0, CLASSES, (NUM_SAMPLES,), generator=generator)
    return x, y


def build(folder: Path) -> tuple[nn.Module, torch.optim.Optimizer, MemoryWrapper]:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(FEATURES, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, CLASSES)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    # Depth 2 and selective replay: the rollback must restore rows, ring and last weights.
    memory = MemoryWrapper(
        model,
        NUM_SAMPLES,
        (FEATURES,),
        depth=2,
        replay_fraction=0.5,
        storage_path=folder / "memory",
    )
    return model, optimizer, memory


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--kill-after", type=int, default=0)
    parser.add_argument("--no-rollback", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, optimizer, memory = build(args.folder)
    (args.folder / "warnings.json").write_text(json.dumps([str(w.message) for w in caught]))
    x_all, y_all = dataset()
    epoch, history, start = 0, [], 0
    checkpoint_path = args.folder / "checkpoint.pt"
    if checkpoint_path.exists():
        checkpoint = torch.load(checkpoint_path, weights_only=True)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        torch.set_rng_state(checkpoint["rng"])
        epoch, history, start = checkpoint["epoch"], checkpoint["history"], checkpoint["step"]
    if not args.no_rollback:
        memory.rollback_to(start)  # the memory as it was when the checkpoint was written
    if start == 0:
        memory.mark_checkpoint()  # a run killed before its first checkpoint restarts from 0

    model.train()
    while epoch < EPOCHS:
        order = torch.randperm(NUM_SAMPLES, generator=torch.Generator().manual_seed(100 + epoch))
        for step in range(STEPS_PER_EPOCH):
            idx = order[step * BATCH : (step + 1) * BATCH]
            x, y = x_all[idx], y_all[idx]
            out = pgd_at(model, x, y, eps=0.1, step_size=0.05, steps=2)
            loss = out.loss + memory(idx, x, out.adv, out.logits, y, adv_logits=out.adv_logits)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history.append(loss.item())
            if memory.step == args.kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
        epoch += 1
        checkpoint = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": torch.get_rng_state(),
            "epoch": epoch,
            "history": history,
            "step": memory.step,  # the memory's step this checkpoint belongs to
        }
        with atomic_write(checkpoint_path) as file:
            torch.save(checkpoint, file)
        memory.mark_checkpoint()  # only once the checkpoint is safely on disk

    final = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "history": history}
    with atomic_write(args.folder / "final.pt") as file:
        torch.save(final, file)
    memory.save(args.folder / "final-memory.bin")
    print("done", flush=True)


if __name__ == "__main__":
    main()
