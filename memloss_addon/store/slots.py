"""Which memory slots of each sample are filled, where the next write goes, and what is known of
each stored example.

Each sample owns ``depth`` consecutive rows of the store, used as a ring: ``ring_head[i]`` is the
slot holding sample ``i``'s newest example and ``slot_count[i]`` how many slots are filled. Slot
``k`` of the read order is the example stored ``k`` writes ago (``k = 0``: the newest). A slot is
named by its flat id ``sample * depth + slot``.

The bookkeeping is declared once, field by field, in :data:`BOOKKEEPING`: its dtype, whether it
holds one value per sample or per slot, its value in a new memory, its valid range when loaded, and
how ranks of a distributed memory keep it. The slot ring, the saved state, the memory file and a
disk-backed memory's files all derive from that table.

All bookkeeping is on the host, with int64 indices that have already been validated, so planning a
read or a write never synchronizes with a GPU. It runs in NumPy, on views of the tensors: a plan
takes about fifteen tiny operations, each several times cheaper in NumPy than in torch, and on a
CPU their fixed costs are a large part of a memory call's overhead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "BOOKKEEPING",
    "FOOLED_UNKNOWN",
    "NEVER_READ",
    "BookkeepingField",
    "ReadPlan",
    "SlotRing",
    "WritePlan",
]

NEVER_READ = math.inf
"""``last_weight`` of a slot whose example the memory has not yet seen through the model."""

FOOLED_UNKNOWN = 255
"""``fooled_at_write`` of a slot stored without the logits of its example (0: no, 1: yes)."""


@dataclass(frozen=True)
class BookkeepingField:
    """One field of the per-sample or per-slot bookkeeping.

    Attributes:
        name: the key in state dicts and memory files.
        dtype: its dtype everywhere (RAM, files, saved states).
        per_slot: one value per slot (``num_samples * depth``) rather than per sample.
        initial: the value in a new memory (``"depth - 1"``: the depth minus one).
        low, high: the inclusive range a loaded value must lie in (``"depth"``: the depth,
            ``"depth - 1"``: the depth minus one; ``None``: unchecked).
        across_ranks: how the ranks of a distributed memory keep it.
        since_version: the first state format version that holds it; an older state gets
            ``initial``.
    """

    name: str
    dtype: torch.dtype
    per_slot: bool
    initial: float | int | str
    low: float | int | None
    high: float | int | str | None
    across_ranks: str
    since_version: int = 1

    def resolve(self, value: float | int | str | None, depth: int) -> float | int | None:
        """A bound or initial value with ``"depth"``/``"depth - 1"`` replaced by numbers."""
        return {"depth": depth, "depth - 1": depth - 1}.get(value, value)  # type: ignore[arg-type]

    def shape(self, num_samples: int, depth: int) -> tuple[int]:
        return (num_samples * depth,) if self.per_slot else (num_samples,)


BOOKKEEPING: tuple[BookkeepingField, ...] = (
    BookkeepingField(
        "slot_count",
        torch.int32,
        per_slot=False,
        initial=0,
        low=0,
        high="depth",
        across_ranks="identical on every rank: every rank applies every rank's writes",
    ),
    BookkeepingField(
        "ring_head",
        torch.int32,
        per_slot=False,
        initial="depth - 1",  # the first write lands in slot 0
        low=0,
        high="depth - 1",
        across_ranks="identical on every rank: every rank applies every rank's writes",
    ),
    BookkeepingField(
        "last_weight",
        torch.float32,
        per_slot=True,
        initial=NEVER_READ,
        low=0.0,
        high=None,  # NEVER_READ (inf) is valid
        across_ranks=(
            "reset to NEVER_READ on every rank by a write; set by the rank whose call ran the "
            "example through the model (selective replay, the one user, runs in one process)"
        ),
        since_version=2,
    ),
    BookkeepingField(
        "fooled_at_write",
        torch.uint8,
        per_slot=True,
        initial=FOOLED_UNKNOWN,
        low=0,
        high=FOOLED_UNKNOWN,
        across_ranks="identical on every rank: exchanged with the acceptance flags of a write",
        since_version=2,
    ),
)
_FIELDS = {field.name: field for field in BOOKKEEPING}


@dataclass(frozen=True)
class ReadPlan:
    """The filled slots of a batch, one row per (sample, slot) pair, newest slot first."""

    sample_of_row: torch.Tensor  # (R,) batch position of each row
    store_rows: torch.Tensor  # (R,) flat slot id of each row (its row in an unsharded store)
    slots_of_sample: torch.Tensor  # (B,) filled slots per batch position

    def newest_rows(self) -> torch.Tensor:
        """The position in this plan of each filled sample's newest slot, in batch order."""
        counts = self.slots_of_sample.numpy()
        firsts = np.cumsum(counts) - counts
        return torch.from_numpy(firsts[counts > 0])


@dataclass(frozen=True)
class WritePlan:
    """Where each accepted, de-duplicated row of a batch goes."""

    batch_positions: torch.Tensor  # (U,) batch position of the row that wins for each sample
    samples: torch.Tensor  # (U,) dataset index written
    store_rows: torch.Tensor  # (U,) flat store row written
    new_heads: torch.Tensor  # (U,) ring head after the write


class SlotRing:
    """Ring positions, fill counts and per-slot facts of ``num_samples`` samples of ``depth`` slots.

    Args:
        num_samples: the samples.
        depth: slots per sample.
        tensors: existing tensors for some fields (a disk-backed memory maps them from its files);
            the others are allocated with their initial value.

    Example:
        >>> ring = SlotRing(num_samples=3, depth=2)
        >>> plan = ring.plan_write(torch.tensor([1, 1]), torch.tensor([True, True]))
        >>> plan.batch_positions.tolist(), plan.store_rows.tolist()  # the last duplicate wins
        ([1], [2])
        >>> ring.commit(plan)
        >>> ring.plan_read(torch.tensor([0, 1])).store_rows.tolist()
        [2]
    """

    slot_count: torch.Tensor
    ring_head: torch.Tensor
    last_weight: torch.Tensor
    fooled_at_write: torch.Tensor

    def __init__(
        self, *, num_samples: int, depth: int, tensors: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        self.num_samples = num_samples
        self.depth = depth
        given = dict(tensors or {})
        for field in BOOKKEEPING:
            tensor = given.pop(field.name, None)
            if tensor is None:
                tensor = torch.full(
                    field.shape(num_samples, depth),
                    field.resolve(field.initial, depth),  # type: ignore[arg-type]
                    dtype=field.dtype,
                )
            setattr(self, field.name, tensor)
        if given:
            raise ValueError(f"unknown bookkeeping fields {sorted(given)}")

    def fields(self) -> dict[str, torch.Tensor]:
        """Every bookkeeping tensor by name (aliases, not copies)."""
        return {field.name: getattr(self, field.name) for field in BOOKKEEPING}

    @property
    def nbytes(self) -> int:
        return sum(tensor.nbytes for tensor in self.fields().values())

    @staticmethod
    def estimate_nbytes(num_samples: int, depth: int) -> int:
        """Bytes of the bookkeeping of a memory of this size."""
        return sum(
            math.prod(field.shape(num_samples, depth)) * field.dtype.itemsize
            for field in BOOKKEEPING
        )

    def plan_read(self, indices: torch.Tensor) -> ReadPlan:
        """The filled slots of ``indices`` (a 1-D int64 CPU tensor of valid indices)."""
        index = indices.numpy()
        counts = self.slot_count.numpy()[index].astype(np.int64)
        if self.depth == 1 and counts.all():  # the usual read: one slot per sample, all filled
            return ReadPlan(
                sample_of_row=torch.arange(index.shape[0]),
                store_rows=torch.from_numpy(index.copy()),
                slots_of_sample=torch.from_numpy(counts),
            )
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
        ordered = np.sort(candidates)
        if not (ordered[1:] == ordered[:-1]).any():  # the usual batch: no repeated index
            last, samples = np.arange(candidates.shape[0]), candidates.astype(np.int64)
        else:
            # The first occurrence in the reversed candidates is the last one in the batch.
            samples, first_reversed = np.unique(candidates[::-1], return_index=True)
            last = candidates.shape[0] - 1 - first_reversed
            # Winners in batch order: a batch without repeats or rejections is then written as it
            # is, without a reordering copy of its rows.
            in_batch_order = np.argsort(last)
            last, samples = last[in_batch_order], samples[in_batch_order].astype(np.int64)
        new_heads = (self.ring_head.numpy()[samples].astype(np.int64) + 1) % self.depth
        return WritePlan(
            batch_positions=torch.from_numpy(positions[last]),
            samples=torch.from_numpy(samples),
            store_rows=torch.from_numpy(samples * self.depth + new_heads),
            new_heads=torch.from_numpy(new_heads),
        )

    def commit(
        self,
        plan: WritePlan,
        fooled: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
    ) -> None:
        """Records a write once its rows are in the store.

        Args:
            plan: the write.
            fooled: ``(U,)``, per written row, whether its example fooled the model when it was
                made: bool, or uint8 codes 0, 1 and :data:`FOOLED_UNKNOWN` (``None``: not known).
            weight: ``(U,)`` float, per written row, ``1 - p_y`` of its example when it was made
                (``None``: not known, the slot's weight becomes :data:`NEVER_READ`).
        """
        samples = plan.samples.numpy()
        self.ring_head.numpy()[samples] = plan.new_heads.numpy()
        counts = self.slot_count.numpy()
        counts[samples] = np.minimum(counts[samples] + 1, self.depth)
        slots = plan.store_rows.numpy()
        self.last_weight.numpy()[slots] = NEVER_READ if weight is None else weight.numpy()
        self.fooled_at_write.numpy()[slots] = (
            FOOLED_UNKNOWN if fooled is None else fooled.numpy().astype(np.uint8)
        )  # bool -> 0/1; uint8 codes unchanged

    def record_weights(self, slots: torch.Tensor, weights: torch.Tensor) -> None:
        """Keeps ``1 - p_y`` of the examples in ``slots`` (flat slot ids) at this read."""
        self.last_weight.numpy()[slots.numpy()] = weights.numpy()

    def check_state(self, state: Mapping[str, object], *, version: int) -> None:
        """Raises if ``state``'s bookkeeping does not fit (shape, dtype, range); changes nothing.

        Fields newer than ``version`` may be absent (they load as their initial value).
        """
        for field in BOOKKEEPING:
            if field.name not in state and field.since_version > version:
                continue
            if field.name not in state:
                raise ValueError(f"memory state has no {field.name!r} entry")
            value = state[field.name]
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"memory state {field.name!r} must be a tensor, got {type(value).__name__}"
                )
            shape = field.shape(self.num_samples, self.depth)
            if tuple(value.shape) != shape or value.dtype != field.dtype:
                raise ValueError(
                    f"memory state {field.name!r} has shape {tuple(value.shape)} and dtype "
                    f"{value.dtype}, expected {shape} and {field.dtype}"
                )
            if not value.numel():
                continue
            low, high = field.resolve(field.low, self.depth), field.resolve(field.high, self.depth)
            below = low is not None and not bool(value.min() >= low)  # NaN fails too
            above = high is not None and bool(value.max() > high)
            if below or above:
                raise ValueError(f"memory state {field.name!r} must lie in [{low}, {high}]")

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copies checked bookkeeping in; fields the state lacks get their initial value."""
        for field in BOOKKEEPING:
            target = getattr(self, field.name)
            if field.name in state:
                target.copy_(state[field.name])
            else:
                target.fill_(field.resolve(field.initial, self.depth))

    def filled_fraction(self) -> float:
        """Filled slots over all slots."""
        total = self.num_samples * self.depth
        return float(self.slot_count.sum(dtype=torch.int64)) / total if total else 0.0
