"""Which memory slots of each sample are filled, and where the next write goes.

Each sample owns ``depth`` consecutive rows of the store, used as a ring: ``ring_head[i]`` is the
slot holding sample ``i``'s newest example and ``slot_count[i]`` how many slots are filled. Slot
``k`` of the read order is the example stored ``k`` writes ago (``k = 0``: the newest).

All bookkeeping is on the host, with int64 indices that have already been validated, so planning a
read or a write never synchronizes with a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

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
        counts = self.slot_count.index_select(0, indices).long()
        heads = self.ring_head.index_select(0, indices).long()
        age = torch.arange(self.depth, dtype=torch.long)
        filled = age.unsqueeze(0) < counts.unsqueeze(1)  # (B, depth)
        positions, ages = filled.nonzero(as_tuple=True)
        slots = (heads.index_select(0, positions) - ages) % self.depth
        store_rows = indices.index_select(0, positions) * self.depth + slots
        return ReadPlan(sample_of_row=positions, store_rows=store_rows, slots_of_sample=counts)

    def plan_write(self, indices: torch.Tensor, accepted: torch.Tensor) -> WritePlan:
        """Plans writing the accepted rows of a batch; for a repeated index the last row wins."""
        positions = accepted.nonzero().squeeze(1)
        candidates = indices.index_select(0, positions)
        samples, inverse = torch.unique(candidates, return_inverse=True)
        order = torch.arange(candidates.shape[0], dtype=torch.long)
        last = torch.full((samples.shape[0],), -1, dtype=torch.long)
        last.scatter_reduce_(0, inverse, order, reduce="amax")
        new_heads = (self.ring_head.index_select(0, samples).long() + 1) % self.depth
        return WritePlan(
            batch_positions=positions.index_select(0, last),
            samples=samples,
            store_rows=samples * self.depth + new_heads,
            new_heads=new_heads,
        )

    def commit(self, plan: WritePlan) -> None:
        """Records a write once its rows are in the store."""
        self.ring_head.index_copy_(0, plan.samples, plan.new_heads.to(torch.int32))
        counts = self.slot_count.index_select(0, plan.samples) + 1
        self.slot_count.index_copy_(0, plan.samples, counts.clamp_(max=self.depth))

    def filled_fraction(self) -> float:
        """Filled slots over all slots."""
        total = self.num_samples * self.depth
        return float(self.slot_count.sum(dtype=torch.int64)) / total if total else 0.0
