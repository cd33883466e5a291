"""A long run: 10,000 steps over a 1,000,000-row memory keep the resident memory flat and the
counters exact."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memloss_addon import MemoryWrapper

NUM_SAMPLES, SHAPE, CLASSES, BATCH, STEPS = 1_000_000, (4,), 3, 128, 10_000
WARM_UP, EVERY = 1_000, 1_000
ALLOWED_GROWTH = 8 * 2**20  # bytes; a leak of 1 KiB a step would add about 9 MiB


def resident_bytes() -> int:
    """Resident set size from /proc/self/statm (second field, in pages)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads RSS from Linux /proc")
def test_ten_thousand_steps_keep_memory_flat_and_counters_exact():
    torch.manual_seed(0)
    model = nn.Linear(SHAPE[0], CLASSES)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    memory = MemoryWrapper(model, NUM_SAMPLES, SHAPE, beta_prime=1.0)
    generator = torch.Generator().manual_seed(1)
    pool = torch.rand(4 * BATCH, *SHAPE, generator=generator)
    labels = torch.randint(0, CLASSES, (4 * BATCH,), generator=generator)

    filled = np.zeros(NUM_SAMPLES, dtype=bool)  # the test's own account of what is stored
    rows_read = terms_computed = 0
    samples = []
    for step in range(STEPS):
        # Random indices: the memory is read from the first steps on, ever more as it fills.
        idx = torch.randint(0, NUM_SAMPLES, (BATCH,), generator=generator)
        window = slice((step % 4) * BATCH, (step % 4 + 1) * BATCH)
        x, y = pool[window], labels[window]
        logits = model(x)
        term = memory(idx, x, (x + 0.01).clamp(0, 1), logits, y)
        optimizer.zero_grad()
        (F.cross_entropy(logits, y) + term).backward()
        optimizer.step()

        already = int(filled[idx.numpy()].sum())  # read before this step's write
        rows_read += already
        terms_computed += already > 0
        filled[idx.numpy()] = True
        if step + 1 >= WARM_UP and (step + 1) % EVERY == 0:
            samples.append(resident_bytes())

    growth = max(samples) - samples[0]
    assert growth < ALLOWED_GROWTH, (
        f"resident memory grew by {growth / 2**20:.1f} MiB over {STEPS - WARM_UP} steps: "
        + ", ".join(f"{s / 2**20:.1f}" for s in samples)
    )
    stats = memory.stats()
    assert stats["calls"] == STEPS
    assert stats["rows_written"] == STEPS * BATCH
    assert stats["rejected_rows"] == 0
    assert stats["rows_read"] == rows_read
    assert stats["terms_computed"] == terms_computed
    assert stats["filled_fraction"] == filled.sum() / NUM_SAMPLES
    assert np.isfinite(stats["mean_term"]) and stats["mean_term"] > 0
