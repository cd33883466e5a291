"""Memory stores spread over the ranks of a ``torch.distributed`` process group.

Under DDP with ``DistributedSampler`` a sample is visited by a different rank almost every epoch,
so each rank must be able to read every sample's memory. Two layouts:

- :class:`ShardedMemoryStore` (``distributed="sharded"``): rank ``r`` holds the slots of the
  samples ``i`` with ``i % world_size == r`` (about ``num_samples / world_size``). Each call
  fetches the rows its batch needs from their owners and sends its new rows to their owners, with
  ``all_to_all_single`` (gloo and NCCL).
- :class:`ReplicatedMemoryStore` (``distributed="replicated"``): every rank holds every slot; a
  read is local and each call's new rows are sent to every other rank.

Both behave exactly like one process that sees the concatenation of all ranks' batches (rank 0
first) in every step:

- every read of a step sees the memory as it was before the step (all reads happen before any
  rank's write of that step);
- each rank's term is over its own batch, as each rank's loss is under DDP: rank ``r``'s term
  equals the term a single-process memory, holding everything every rank has written before,
  computes for rank ``r``'s batch;
- when several rows write one sample in one step (``DistributedSampler`` pads the last ranks with
  repeated indices) the last accepted row of the concatenated batch wins: the highest rank's,
  and within a rank the last one. A rejected (non-finite) row never wins, on any rank.

The slot bookkeeping (fill counts, ring heads: 8 bytes a sample) is replicated: every rank applies
the same write plan, computed from the gathered indices and acceptance flags of the step, so the
fill fraction and the rejected-row counters agree on every rank without extra communication.

Collectives per call, in order (the first one carries a status so that a call that fails its
argument checks on one rank raises on every rank instead of leaving the others waiting):

1. ``all_gather`` of a ``[status, batch_size]`` header;
2. ``all_gather`` of the batch indices, padded to the largest batch;
3. sharded only, when the term is computed: ``all_to_all_single`` of the rows read from owners;
4. ``all_gather`` of the acceptance flags of the rows written, padded likewise;
5. ``all_to_all_single`` of the accepted, de-duplicated rows: to their owner (sharded) or to every
   other rank (replicated).

Rows travel encoded, in the storage dtype (a uint8 memory sends bytes). ``stats()`` reports the
payload bytes this rank received from other ranks in the last call and in total.

Every rank must make the same calls with the same ``beta_prime`` (a call with ``beta_prime=0``
skips the read exchange). An exception raised on one rank after the first collective of a call
(in the model's forward pass, out of memory) is not announced to the others: they wait in the next
collective until the process group's timeout, or until ``torchrun`` stops them when the failed
rank exits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from .local import MemoryRead, MemoryStore

__all__ = [
    "ReplicatedMemoryStore",
    "ShardedMemoryStore",
    "merge_shard_states",
]


@dataclass(frozen=True)
class _GlobalBatch:
    """The indices of one step on every rank, concatenated in rank order."""

    local: torch.Tensor  # this rank's indices
    indices: torch.Tensor  # (G,) every rank's indices
    sizes: list[int]  # batch size of each rank
    rank_of_position: torch.Tensor  # (G,) the rank that holds each position
    start: int  # this rank's first position

    @property
    def max_size(self) -> int:
        return max(self.sizes)


class _Exchange:
    """The collectives of the memory over one process group, with their received-byte counts."""

    def __init__(self, group: dist.ProcessGroup | None, store_device: torch.device) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "a distributed memory needs torch.distributed initialized first "
                "(torch.distributed.init_process_group)"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        backend = str(dist.get_backend(group)).lower()
        # NCCL exchanges CUDA tensors only; gloo (and the CPU half of a mixed backend) CPU ones.
        if backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
        elif "nccl" in backend and store_device.type == "cuda":
            self.device = store_device
        else:
            self.device = torch.device("cpu")
        self.bytes_last_call = 0
        self.bytes_total = 0

    def _received(self, nbytes: int) -> None:
        self.bytes_last_call += nbytes
        self.bytes_total += nbytes

    def gather_padded(self, values: torch.Tensor, length: int) -> torch.Tensor:
        """``(world_size, length)``: every rank's 1-D ``values``, zero-padded to ``length``."""
        padded = torch.zeros(length, dtype=values.dtype, device=self.device)
        padded[: values.shape[0]] = values.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self.group)
        self._received((self.world_size - 1) * padded.nbytes)
        return torch.stack(parts).cpu()

    def exchange_rows(
        self, rows: torch.Tensor, send_counts: list[int], recv_counts: list[int]
    ) -> torch.Tensor:
        """Sends ``rows`` (grouped by destination rank) and returns the rows received.

        Rows are sent as raw bytes, so every storage dtype travels on every backend.
        """
        row_shape, dtype = tuple(rows.shape[1:]), rows.dtype
        row_bytes = math.prod(row_shape) * rows.element_size()
        flat = rows.to(self.device).contiguous().reshape(rows.shape[0], math.prod(row_shape))
        send = flat.view(torch.uint8).reshape(rows.shape[0], row_bytes)
        received = torch.empty((sum(recv_counts), row_bytes), dtype=torch.uint8, device=self.device)
        dist.all_to_all_single(
            received,
            send,
            output_split_sizes=recv_counts,
            input_split_sizes=send_counts,
            group=self.group,
        )
        self._received(received.nbytes)
        return received.view(dtype).reshape(-1, *row_shape)


def _counts(ranks: torch.Tensor, world_size: int) -> list[int]:
    return torch.bincount(ranks, minlength=world_size).tolist()


def _stable_order(keys: torch.Tensor) -> torch.Tensor:
    return torch.sort(keys, stable=True).indices


class _DistributedStore(MemoryStore):
    """What both layouts share: the step's gathered batch, acceptance flags and counters."""

    def __init__(self, *, process_group: dist.ProcessGroup | None = None, **options: Any) -> None:
        device = torch.device(options.get("device", "cpu"))
        self.exchange = _Exchange(process_group, device)
        self.rank = self.exchange.rank
        self.world_size = self.exchange.world_size
        super().__init__(**options)
        self._step: _GlobalBatch | None = None
        self._rows_accepted_all = 0
        self._rows_rejected_all = 0

    # ----------------------------------------------------------- the first collective of a call

    def _gather_batch(self, indices: torch.Tensor, *, ok: bool = True) -> _GlobalBatch | None:
        self.exchange.bytes_last_call = 0
        self._step = None
        header = torch.tensor([0 if ok else 1, indices.shape[0]], dtype=torch.int64)
        headers = self.exchange.gather_padded(header, 2)
        failed = [rank for rank in range(self.world_size) if int(headers[rank, 0])]
        if failed:
            if not ok:
                return None
            raise RuntimeError(
                f"the memory call failed its argument checks on rank(s) {failed}; it is abandoned "
                "on every rank and the memory is unchanged"
            )
        sizes = headers[:, 1].tolist()
        if max(sizes) > 0:
            gathered = self.exchange.gather_padded(indices, max(sizes))
            everyone = torch.cat([gathered[rank, :size] for rank, size in enumerate(sizes)])
        else:
            everyone = torch.zeros(0, dtype=torch.int64)
        rank_of_position = torch.repeat_interleave(
            torch.arange(self.world_size), torch.tensor(sizes)
        )
        start = sum(sizes[: self.rank])
        return _GlobalBatch(indices, everyone, sizes, rank_of_position, start)

    def _batch_for_write(self, indices: torch.Tensor) -> _GlobalBatch:
        step, self._step = self._step, None
        if step is None:  # no read in this call (beta_prime == 0): gather here
            step = self._gather_batch(indices)
            assert step is not None
        elif not torch.equal(step.local, indices):
            raise RuntimeError("a distributed memory must write the indices it has just read")
        return step

    def abort(self) -> None:
        """Tells the other ranks that this call failed its argument checks (they raise too)."""
        self._gather_batch(torch.zeros(0, dtype=torch.int64), ok=False)

    def _gather_accepted(self, step: _GlobalBatch, accepted: torch.Tensor) -> torch.Tensor:
        gathered = self.exchange.gather_padded(accepted.to(torch.uint8), step.max_size)
        flags = torch.cat([gathered[rank, :size] for rank, size in enumerate(step.sizes)])
        everyone = flags.bool()
        self._rows_accepted_all += int(everyone.sum())
        self._rows_rejected_all += int(everyone.numel() - everyone.sum())
        return everyone

    def _encoded_rows(self, encoded: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return encoded.index_select(0, positions.to(encoded.device))

    # ----------------------------------------------------------- reporting

    def stats(self) -> dict[str, float | int]:
        """Received bytes (payload from other ranks), this rank's rows and every rank's writes."""
        return {
            "comm_bytes_last_step": self.exchange.bytes_last_call,
            "comm_bytes_total": self.exchange.bytes_total,
            "local_rows": self.local_rows,
            "world_size": self.world_size,
            "rows_accepted_all_ranks": self._rows_accepted_all,
            "rows_rejected_all_ranks": self._rows_rejected_all,
        }

    def prefetch(self, indices: torch.Tensor, device: torch.device | None = None) -> None:
        """Ignored: a distributed read starts with a collective, which cannot run ahead alone."""


class ReplicatedMemoryStore(_DistributedStore):
    """Every rank holds every slot; each step's accepted rows are sent to every other rank.

    Takes the arguments of :class:`MemoryStore` plus ``process_group`` (default: the world).
    """

    def read(self, indices: torch.Tensor, clean: torch.Tensor) -> MemoryRead:
        step = self._gather_batch(indices)
        assert step is not None
        read = super().read(indices, clean)
        anyone = bool(self.ring.slot_count.index_select(0, step.indices).any())
        self._step = step
        return replace(read, run_forward=anyone)

    def prefetch(self, indices: torch.Tensor, device: torch.device | None = None) -> None:
        """Starts reading locally: every row is here, only the bookkeeping is exchanged."""
        MemoryStore.prefetch(self, indices, device)

    def write(self, indices: torch.Tensor, adv: torch.Tensor, clean: torch.Tensor) -> int:
        step = self._batch_for_write(indices)
        encoded, accepted = self.codec.encode(adv, clean)
        accepted = accepted.cpu()
        plan = self.ring.plan_write(step.indices, self._gather_accepted(step, accepted))
        self._invalidate_prefetch(plan.samples)
        writer = step.rank_of_position.index_select(0, plan.batch_positions)
        mine = (writer == self.rank).nonzero().squeeze(1)
        own_rows = self._encoded_rows(encoded, plan.batch_positions[mine] - step.start)
        others = (writer != self.rank).nonzero().squeeze(1)
        others = others[_stable_order(writer[others])]  # they arrive grouped by writer
        send_counts = [0 if rank == self.rank else mine.numel() for rank in range(self.world_size)]
        recv_counts = _counts(writer[others], self.world_size)
        send = own_rows.repeat(self.world_size - 1, *([1] * len(self.sample_shape)))
        received = self.exchange.exchange_rows(send, send_counts, recv_counts)
        if mine.numel():
            self.rows.write(plan.store_rows[mine], own_rows)
        if others.numel():
            self.rows.write(plan.store_rows[others], received)
        self.ring.commit(plan)
        return int(accepted.numel() - accepted.sum())


class ShardedMemoryStore(_DistributedStore):
    """Rank ``r`` holds the slots of samples ``i`` with ``i % world_size == r``.

    Takes the arguments of :class:`MemoryStore` plus ``process_group`` (default: the world).
    :meth:`state_dict` returns this rank's shard (no collective); load it back on the same rank
    and world size, or combine all ranks' shards with :func:`merge_shard_states` to load into any
    world size, a replicated or a single-process memory.
    """

    @property
    def local_rows(self) -> int:
        """Samples owned by this rank: ``ceil((num_samples - rank) / world_size)``."""
        return max(0, -(-(self.num_samples - self.rank) // self.world_size))

    def _disk_layout(self, folder: str) -> tuple[str, dict[str, Any]]:
        # Each rank keeps its shard, and its copy of the bookkeeping, in a folder of its own.
        shard = {"rank": self.rank, "world_size": self.world_size}
        return f"{folder}/rank{self.rank}-of-{self.world_size}", {**self.config(), **shard}

    def _local_store_rows(self, samples: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return torch.div(samples, self.world_size, rounding_mode="floor") * self.depth + slots

    def read(self, indices: torch.Tensor, clean: torch.Tensor) -> MemoryRead:
        step = self._gather_batch(indices)
        assert step is not None
        plan = self.ring.plan_read(step.indices)  # every rank's read, in position order
        samples = step.indices.index_select(0, plan.sample_of_row)
        owner = samples % self.world_size
        reader = step.rank_of_position.index_select(0, plan.sample_of_row)
        local_row = self._local_store_rows(samples, plan.store_rows % self.depth)
        # Rows this rank owns and others read, grouped by reader (plan order within a reader).
        serve = ((owner == self.rank) & (reader != self.rank)).nonzero().squeeze(1)
        serve = serve[_stable_order(reader[serve])]
        # This rank's rows, in the order its batch needs them.
        mine = (reader == self.rank).nonzero().squeeze(1)
        mine_owner = owner.index_select(0, mine)
        remote = (mine_owner != self.rank).nonzero().squeeze(1)
        remote = remote[_stable_order(mine_owner[remote])]  # they arrive grouped by owner
        here = (mine_owner == self.rank).nonzero().squeeze(1)
        send_counts = _counts(reader[serve], self.world_size)
        recv_counts = _counts(mine_owner[remote], self.world_size)
        sent = self.rows.read(local_row[serve], self.exchange.device)
        received = self.exchange.exchange_rows(sent, send_counts, recv_counts)
        self._step = step
        stored = torch.empty(
            (mine.numel(), *self.sample_shape), dtype=self.dtype, device=clean.device
        )
        if here.numel():
            stored[here.to(clean.device)] = self.rows.read(local_row[mine[here]], clean.device)
        if remote.numel():
            stored[remote.to(clean.device)] = received.to(clean.device)
        sample_of_row = plan.sample_of_row.index_select(0, mine) - step.start
        slots_of_sample = plan.slots_of_sample[step.start : step.start + indices.shape[0]]
        run_forward = plan.store_rows.numel() > 0
        if mine.numel() == 0:
            empty = clean.new_empty((0, *self.sample_shape))
            return MemoryRead(empty, sample_of_row, slots_of_sample, run_forward)
        clean_rows = clean.detach().index_select(0, sample_of_row.to(clean.device))
        examples = self.codec.decode(stored, clean_rows)
        return MemoryRead(examples, sample_of_row, slots_of_sample, run_forward)

    def write(self, indices: torch.Tensor, adv: torch.Tensor, clean: torch.Tensor) -> int:
        step = self._batch_for_write(indices)
        encoded, accepted = self.codec.encode(adv, clean)
        accepted = accepted.cpu()
        plan = self.ring.plan_write(step.indices, self._gather_accepted(step, accepted))
        writer = step.rank_of_position.index_select(0, plan.batch_positions)
        owner = plan.samples % self.world_size
        local_row = self._local_store_rows(plan.samples, plan.new_heads)
        mine = (writer == self.rank).nonzero().squeeze(1)
        outgoing = mine[owner[mine] != self.rank]
        outgoing = outgoing[_stable_order(owner[outgoing])]  # grouped by owner
        kept = mine[owner[mine] == self.rank]
        owned = (owner == self.rank).nonzero().squeeze(1)
        incoming = owned[writer[owned] != self.rank]
        incoming = incoming[_stable_order(writer[incoming])]  # they arrive grouped by writer
        sent = self._encoded_rows(encoded, plan.batch_positions[outgoing] - step.start)
        received = self.exchange.exchange_rows(
            sent,
            _counts(owner[outgoing], self.world_size),
            _counts(writer[incoming], self.world_size),
        )
        if kept.numel():
            own_rows = self._encoded_rows(encoded, plan.batch_positions[kept] - step.start)
            self.rows.write(local_row[kept], own_rows)
        if incoming.numel():
            self.rows.write(local_row[incoming], received)
        self.ring.commit(plan)
        return int(accepted.numel() - accepted.sum())

    # ----------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard: its slots, the (replicated) bookkeeping and its place."""
        return {
            "slots": self.rows.data.view(self.local_rows, self.depth, *self.sample_shape),
            "slot_count": self.ring.slot_count,
            "ring_head": self.ring.ring_head,
            "shard": {"rank": self.rank, "world_size": self.world_size},
        }

    def check_state(self, state: dict[str, Any]) -> None:
        shard = state.get("shard")
        if shard is None:  # a full state: this rank keeps its own samples
            MemoryStore.check_state(self, state)
            return
        mine = {"rank": self.rank, "world_size": self.world_size}
        if shard != mine:
            raise ValueError(
                f"memory state is the shard {shard!r} but this rank is {mine}; combine every "
                "rank's state with memloss_addon.store.distributed.merge_shard_states() to load "
                "into another rank or world size"
            )
        full = {**state, "slots": _placeholder_full_slots(state["slots"], self)}
        full.pop("shard")
        MemoryStore.check_state(self, full)
        slots = state["slots"]
        if tuple(slots.shape) != (self.local_rows, self.depth, *self.sample_shape):
            raise ValueError(
                f"memory state 'slots' has shape {tuple(slots.shape)}, expected "
                f"{(self.local_rows, self.depth, *self.sample_shape)} for this rank's shard"
            )

    def load_state(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        self._prefetched = None
        slots = state["slots"]
        if state.get("shard") is None:
            slots = slots[self.rank :: self.world_size]
        self.rows.load_(slots.reshape(self.rows.data.shape))
        self.ring.slot_count.copy_(state["slot_count"])
        self.ring.ring_head.copy_(state["ring_head"])


def _placeholder_full_slots(slots: object, store: ShardedMemoryStore) -> object:
    """A zero-strided stand-in of the full slots, so the shared checks see the full shape."""
    if not isinstance(slots, torch.Tensor):
        return slots
    # Row-wise max and min propagate NaN and Inf without a slot-sized temporary.
    flat = slots.reshape(slots.shape[0], -1) if slots.dim() and slots.numel() else None
    if (
        slots.is_floating_point()
        and flat is not None
        and not bool(
            torch.isfinite(flat.amax(dim=1)).all() and torch.isfinite(flat.amin(dim=1)).all()
        )
    ):
        raise ValueError("memory state 'slots' holds NaN or Inf values")
    shape = (store.num_samples, store.depth, *store.sample_shape)
    return torch.zeros((), dtype=slots.dtype).expand(shape)


def merge_shard_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Combines the state dicts of every rank of a sharded memory into one full state dict.

    The result loads into a memory of any world size and layout, or a single-process one. The
    counters are rank 0's.

    Raises:
        ValueError: the states are not one complete set of shards of one memory.

    Example:
        >>> shard = {"format_version": 1, "config": {"num_samples": 3}, "counters": {},
        ...          "slot_count": torch.ones(3, dtype=torch.int32),
        ...          "ring_head": torch.zeros(3, dtype=torch.int32)}
        >>> merged = merge_shard_states([
        ...     {**shard, "slots": torch.tensor([[[0.0]], [[2.0]]]),
        ...      "shard": {"rank": 0, "world_size": 2}},
        ...     {**shard, "slots": torch.tensor([[[1.0]]]), "shard": {"rank": 1, "world_size": 2}},
        ... ])
        >>> merged["slots"].flatten().tolist(), "shard" in merged
        ([0.0, 1.0, 2.0], False)
    """
    if not states:
        raise ValueError("merge_shard_states needs at least one state")
    shards: list[dict[str, Any]] = [
        shard if isinstance(shard := state.get("shard"), dict) else {} for state in states
    ]
    if not all(shards):
        raise ValueError("every state must be a shard (a sharded memory's state_dict())")
    world_size = shards[0].get("world_size")
    # A missing or non-int rank sorts as -1, which fails the check below.
    ranks = sorted(rank if isinstance(rank := shard.get("rank"), int) else -1 for shard in shards)
    if (
        any(shard.get("world_size") != world_size for shard in shards)
        or ranks != list(range(len(states)))
        or world_size != len(states)
    ):
        raise ValueError(
            "need the shard of every rank 0 to world_size - 1 exactly once, got (rank, "
            f"world_size) = {[(s.get('rank'), s.get('world_size')) for s in shards]}"
        )
    by_rank = sorted(states, key=lambda state: state["shard"]["rank"])
    first = by_rank[0]
    for state in by_rank[1:]:
        if state.get("config") != first.get("config"):
            raise ValueError("the shards come from memories of different configurations")
        for key in ("slot_count", "ring_head"):
            if not torch.equal(state[key], first[key]):
                raise ValueError(f"the shards disagree on {key!r}: they come from different steps")
    num_samples = first["slot_count"].shape[0]
    local = first["slots"]
    slots = torch.zeros((num_samples, *local.shape[1:]), dtype=local.dtype)
    for rank, state in enumerate(by_rank):
        owned = torch.arange(rank, num_samples, world_size)
        if state["slots"].shape[0] != owned.numel():
            raise ValueError(
                f"the shard of rank {rank} has {state['slots'].shape[0]} samples, expected "
                f"{owned.numel()}"
            )
        slots.index_copy_(0, owned, state["slots"].to("cpu"))
    merged = {key: value for key, value in first.items() if key != "shard"}
    merged["slots"] = slots
    return merged
