"""A tiny MemLoss training run that checkpoints mid-epoch and resumes from its last checkpoint.

Run as a script by ``tests/test_kill_resume.py``, which kills it with SIGKILL and starts it again::

    python tests/resumable_training.py RUN_FOLDER [--step-delay SECONDS]

Every ``CHECKPOINT_EVERY`` steps it saves the memory to its own file, then atomically replaces
``checkpoint.pt`` (model, optimizer, torch RNG state, epoch, step in the epoch, loss history and
the name of that memory file), then deletes older memory files. A kill at any moment therefore
leaves a checkpoint whose memory file exists. At the end it writes ``final.pt`` and
``final-memory.bin``. It prints ``step N`` after each step and ``done`` at the end.

Determinism: one thread, the batch order of epoch ``e`` drawn from its
own generator seeded with ``e`` (so a resumed epoch skips the batches already done), and the
global RNG (PGD's random start, dropout) saved and restored.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from memloss_addon import MemoryWrapper
from memloss_addon.objectives import pgd_at
from memloss_addon.store.files import atomic_write

NUM_SAMPLES, FEATURES, CLASSES = 40, 6, 3
BATCH, EPOCHS, CHECKPOINT_EVERY = 8, 4, 3
STEPS_PER_EPOCH = NUM_SAMPLES // BATCH


def dataset() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(NUM_SAMPLES, FEATURES, generator=generator)
    y = torch.randint(0, CLASSES, (NUM_SAMPLES,), generator=generator)
    return x, y


def batch_order(epoch: int) -> torch.Tensor:
    return torch.randperm(NUM_SAMPLES, generator=torch.Generator().manual_seed(1000 + epoch))


def build() -> tuple[nn.Module, torch.optim.Optimizer, MemoryWrapper]:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(FEATURES, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, CLASSES)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    memory = MemoryWrapper(model, NUM_SAMPLES, (FEATURES,), depth=2, beta_prime=2.0)
    return model, optimizer, memory


def save_checkpoint(folder: Path, model, optimizer, memory, *, epoch, step, history) -> None:
    global_step = epoch * STEPS_PER_EPOCH + step
    memory_file = f"memory-{global_step:05d}.bin"
    memory.save(folder / memory_file)
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": torch.get_rng_state(),
        "epoch": epoch,
        "step_in_epoch": step,
        "history": history,
        "memory_file": memory_file,
    }
    with atomic_write(folder / "checkpoint.pt") as file:
        torch.save(checkpoint, file)
    for old in folder.glob("memory-*.bin"):
        if old.name != memory_file:
            old.unlink()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--step-delay", type=float, default=0.0)
    args = parser.parse_args()
    # One thread makes every CPU kernel used here deterministic. (use_deterministic_algorithms
    # would only enforce that, and importing the compiler stack it loads takes seconds.)
    torch.set_num_threads(1)

    model, optimizer, memory = build()
    x_all, y_all = dataset()
    epoch, step, history = 0, 0, []
    checkpoint_path = args.folder / "checkpoint.pt"
    if checkpoint_path.exists():
        checkpoint = torch.load(checkpoint_path, weights_only=True)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        memory.load(args.folder / checkpoint["memory_file"])
        torch.set_rng_state(checkpoint["rng"])
        epoch, step, history = (
            checkpoint["epoch"],
            checkpoint["step_in_epoch"],
            checkpoint["history"],
        )

    model.train()
    while epoch < EPOCHS:
        order = batch_order(epoch)
        while step < STEPS_PER_EPOCH:
            idx = order[step * BATCH : (step + 1) * BATCH]
            x, y = x_all[idx], y_all[idx]
            out = pgd_at(model, x, y, eps=0.1, step_size=0.05, steps=2)
            loss = out.loss + memory(idx, x, out.adv, out.logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history.append(loss.item())
            step += 1
            global_step = epoch * STEPS_PER_EPOCH + step
            if global_step % CHECKPOINT_EVERY == 0:
                save_checkpoint(
                    args.folder, model, optimizer, memory, epoch=epoch, step=step, history=history
                )
            print(f"step {global_step}", flush=True)
            time.sleep(args.step_delay)
        epoch, step = epoch + 1, 0

    final = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": torch.get_rng_state(),
        "history": history,
        "stats": memory.stats(),
    }
    with atomic_write(args.folder / "final.pt") as file:
        torch.save(final, file)
    memory.save(args.folder / "final-memory.bin")
    print("done", flush=True)


if __name__ == "__main__":
    main()
