"""Which memory slots of each sample are filled, and where the next write goes.

Each sample owns ``depth`` consecutive rows of the store, used as a ring: ``ring_head[i]`` is the
slot holding sample ``i``'s newest example and ``slot_count[i]`` how many slots are filled. Slot
``k`` of the read order is the example stored ``k`` writes ago (``k = 0``: the newest).

All bookkeeping is on the host, with int64 indices that have already been validated, so planning a
read or a write never synchronizes with a GPU. It runs in NumPy, on views of the tensors: a plan
takes about fifteen tiny operations, each several times cheaper in NumPy than in torch, and on a
CPU their fixed costs are a large part of a memory call's overhead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ReadPlan", "SlotRing", "WritePlan"]


@dataclass(frozen=True)
class ReadPlan:
    """The filled slots of a batch, one row per (sample, slot) pair."""

    sample_of_row: torch.Tensor  # (R,) batch position of each row
    store_rows: torch.Tensor  # (R,) flat store row of each row
    slots_of_sample: torch.Tensor  # (B,) filled slots per batch position


@dataclass(frozen=True)
class WritePlan:
    """Where each accepted, de-duplicated row of a batch goes."""

    batch_positions: torch.Tensor  # (U,) batch position of the row that wins for each sample
    samples: torch.Tensor  # (U,) dataset index written
    store_rows: torch.Tensor  # (U,) flat store row written
    new_heads: torch.Tensor  # (U,) ring head after the write


class SlotRing:
    """Ring positions and fill counts of ``num_samples`` samples with ``depth`` slots each.

    Example:
        >>> ring = SlotRing(num_samples=3, depth=2)
        >>> plan = ring.plan_write(torch.tensor([1, 1]), torch.tensor([True, True]))
        >>> plan.batch_positions.tolist(), plan.store_rows.tolist()  # the last duplicate wins
        ([1], [2])
        >>> ring.commit(plan)
        >>> ring.plan_read(torch.tensor([0, 1])).store_rows.tolist()
        [2]
    """

    def __init__(self, *, num_samples: int, depth: int) -> None:
        self.num_samples = num_samples
        self.depth = depth
        # Head starts at the last slot so that the first write lands in slot 0.
        self.ring_head = torch.full((num_samples,), depth - 1, dtype=torch.int32)
        self.slot_count = torch.zeros((num_samples,), dtype=torch.int32)

    @property
    def nbytes(self) -> int:
        return self.ring_head.nbytes + self.slot_count.nbytes

    def plan_read(self, indices: torch.Tensor) -> ReadPlan:
        """The filled slots of ``indices`` (a 1-D int64 CPU tensor of valid indices)."""
        index = indices.numpy()
        counts = self.slot_count.numpy()[index].astype(np.int64)
        heads = self.ring_head.numpy()[index].astype(np.int64)
        filled = np.arange(self.depth) < counts[:, None]  # (B, depth), row-major: by position
        positions, ages = np.nonzero(filled)
        slots = (heads[positions] - ages) % self.depth
        store_rows = index[positions] * self.depth + slots
        return ReadPlan(
            sample_of_row=torch.from_numpy(positions.astype(np.int64)),
            store_rows=torch.from_numpy(store_rows),
            slots_of_sample=torch.from_numpy(counts),
        )

    def plan_write(self, indices: torch.Tensor, accepted: torch.Tensor) -> WritePlan:
        """Plans writing the accepted rows of a batch; for a repeated index the last row wins."""
        positions = np.flatnonzero(accepted.numpy()).astype(np.int64)
        candidates = indices.numpy()[positions]
        # The first occurrence in the reversed candidates is the last one in the batch.
        samples, first_reversed = np.unique(candidates[::-1], return_index=True)
        last = candidates.shape[0] - 1 - first_reversed
        # Winners in batch order: a batch without repeats or rejections is then written as it is,
        # without a reordering copy of its rows.
        in_batch_order = np.argsort(last)
        last, samples = last[in_batch_order], samples[in_batch_order].astype(np.int64)
        new_heads = (self.ring_head.numpy()[samples].astype(np.int64) + 1) % self.depth
        return WritePlan(
            batch_positions=torch.from_numpy(positions[last]),
            samples=torch.from_numpy(samples),
            store_rows=torch.from_numpy(samples * self.depth + new_heads),
            new_heads=torch.from_numpy(new_heads),
        )

    def commit(self, plan: WritePlan) -> None:
        """Records a write once its rows are in the store."""
        samples = plan.samples.numpy()
        self.ring_head.numpy()[samples] = plan.new_heads.numpy()
        counts = self.slot_count.numpy()
        counts[samples] = np.minimum(counts[samples] + 1, self.depth)

    def filled_fraction(self) -> float:
        """Filled slots over all slots."""
        total = self.num_samples * self.depth
        return float(self.slot_count.sum(dtype=torch.int64)) / total if total else 0.0
