"""Sharded and replicated memories on 2 and 3 gloo processes against a single-process reference.

Each world size is spawned once (module fixtures); the workers run every scenario and write their
results to JSON files, and the tests compare them with a plain-loop reference replayed here on
the same global batches: the concatenation of every rank's batch, rank 0 first.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from memloss_addon import MemoryWrapper
from memloss_addon.store.distributed import merge_shard_states
from tests.helpers import ReferenceMemory, adversarial_stand_in, mlp

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")

FEATURES, CLASSES, BATCH, DEPTH, EPOCHS = 4, 3, 3, 2, 3
ROW_BYTES = FEATURES * 4  # one float32 row
# Dataset sizes per world size: the first divides evenly, the second makes DistributedSampler pad.
SIZES = {2: (12, 11), 3: (12, 10)}
LAYOUTS = ("sharded", "replicated")


# ---------------------------------------------------------------------- shared by both sides


def dataset(num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(num_samples)
    data = torch.rand(num_samples, FEATURES, generator=generator, dtype=torch.float64)
    return data, torch.arange(num_samples) % CLASSES


def rank_batches(num_samples: int, world_size: int, rank: int, epoch: int) -> list[torch.Tensor]:
    sampler = DistributedSampler(
        range(num_samples), num_replicas=world_size, rank=rank, shuffle=True, seed=0
    )
    sampler.set_epoch(epoch)
    order = torch.tensor(list(sampler))
    return list(order.split(BATCH))


def adversarial(x: torch.Tensor, epoch: int, rank: int) -> torch.Tensor:
    """Differs by rank, so that which rank's row was stored is visible."""
    return adversarial_stand_in(x, epoch + 7 * rank)


# ---------------------------------------------------------------------- worker side


def _train(memory, model, num_samples, world_size, rank, epochs) -> dict:
    data, labels = dataset(num_samples)
    terms, comm = [], []
    for epoch in epochs:
        for idx in rank_batches(num_samples, world_size, rank, epoch):
            x = data[idx]
            term = memory(idx, x, adversarial(x, epoch, rank), model(x), labels[idx])
            terms.append(term.item())
            comm.append(memory.stats()["comm_bytes_last_step"])
    return {"terms": terms, "comm": comm, "stats": memory.stats(), "local_rows": memory.local_rows}


def _duplicates(layout: str, rank: int, world_size: int) -> dict:
    """Every rank writes sample 0 in one step; the highest rank's row for sample 1 is NaN."""
    memory = MemoryWrapper(mlp(), 6, (FEATURES,), depth=1, distributed=layout)
    x = torch.full((2, FEATURES), 0.5, dtype=torch.float64)
    adv = torch.stack(
        [
            torch.full((FEATURES,), 0.1 * (rank + 1), dtype=torch.float64),
            torch.full((FEATURES,), math.nan if rank == world_size - 1 else 0.2 + 0.1 * rank),
        ]
    ).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        memory(torch.tensor([0, 1]), x, adv, torch.zeros(2, CLASSES), torch.tensor([0, 1]))
    return {
        "slots": memory.state_dict()["slots"][:, 0].tolist(),
        "stats": memory.stats(),
    }


def _recall(layout: str, rank: int, world_size: int) -> dict:
    """Rank r stores samples 2r and 2r + 1 (with their logits), then recalls the next rank's."""
    model = mlp()
    memory = MemoryWrapper(model, 2 * world_size, (FEATURES,), distributed=layout)
    mine = torch.tensor([2 * rank, 2 * rank + 1])
    x = torch.full((2, FEATURES), 0.5, dtype=torch.float64)
    adv = torch.stack([torch.full((FEATURES,), 0.01 * int(i), dtype=torch.float64) for i in mine])
    # Sample 2r "fools the model when made", sample 2r + 1 not: logits chosen to make it so.
    targets = torch.tensor([0, 1])
    adv_logits = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    memory(mine, x, adv, model(x), targets, adv_logits=adv_logits)
    fooled_first = memory.state_dict()["fooled_at_write"].tolist()
    theirs = torch.tensor([(2 * rank + 2) % (2 * world_size), (2 * rank + 3) % (2 * world_size)])
    exchange = memory.store.exchange
    counts = {"rows": 0, "gathers": 0}
    real_rows, real_gather = exchange.exchange_rows, exchange.gather_padded

    def rows(*args, **kwargs):
        counts["rows"] += 1
        return real_rows(*args, **kwargs)

    def gather(*args, **kwargs):
        counts["gathers"] += 1
        return real_gather(*args, **kwargs)

    exchange.exchange_rows, exchange.gather_padded = rows, gather
    start, found = memory.recall(theirs, x)
    memory(theirs, x, x, model(x), targets)
    return {
        "start": start.tolist(),
        "found": found.tolist(),
        "counts": counts,
        "fooled_first": fooled_first,
        "fooled": memory.state_dict()["fooled_at_write"].tolist(),
    }


def _bad_call(rank: int, world_size: int) -> dict:
    memory = MemoryWrapper(mlp(), 6, (FEATURES,), distributed="sharded")
    x = torch.full((2, FEATURES), 0.5, dtype=torch.float64)
    logits, targets = torch.zeros(2, CLASSES), torch.tensor([0, 1])
    bad = torch.tensor([0, 99]) if rank == world_size - 1 else torch.tensor([0, 1])
    try:
        memory(bad, x, x, logits, targets)
        raised = None
    except Exception as error:  # noqa: BLE001 - the type is the result
        raised = type(error).__name__
    memory(torch.tensor([2, 3]), x, x, logits, targets)  # the group still works
    return {"raised": raised, "filled": memory.stats()["filled_fraction"]}


def _resharding(rank: int, out_dir: Path) -> dict:
    """Trains on ranks 0-1 (a 2-rank group), saves shards, continues on all 3 ranks."""
    num_samples = SIZES[3][1]
    pair = dist.new_group([0, 1])
    if rank < 2:
        memory = MemoryWrapper(
            mlp(), num_samples, (FEATURES,), depth=DEPTH, distributed="sharded", process_group=pair
        )
        _train(memory, memory.model, num_samples, 2, rank, range(2))
        torch.save(memory.state_dict(), out_dir / f"shard{rank}.pt")
    dist.barrier()
    states = [torch.load(out_dir / f"shard{k}.pt", weights_only=True) for k in range(2)]
    result = {}
    if rank < 2:  # each rank of the pair reloads its own shard, and refuses the other one
        again = MemoryWrapper(
            mlp(), num_samples, (FEATURES,), depth=DEPTH, distributed="sharded", process_group=pair
        )
        try:
            again.load_state_dict(states[1 - rank])
        except ValueError as error:
            result["other_shard"] = str(error)
        again.load_state_dict(states[rank])
        result["same_world"] = _train(again, again.model, num_samples, 2, rank, range(2, 4))[
            "terms"
        ]
    full = merge_shard_states(states)
    for layout in LAYOUTS:
        memory = MemoryWrapper(mlp(), num_samples, (FEATURES,), depth=DEPTH, distributed=layout)
        memory.load_state_dict(full)
        result[layout] = _train(memory, memory.model, num_samples, 3, rank, range(2, 4))["terms"]
    if rank == 0:
        torch.save(full, out_dir / "merged.pt")
    return result


def _ddp(rank: int) -> dict:
    """A DDP-wrapped BatchNorm model trained with the memory; a rank may have no rows in a step."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(FEATURES, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    model = DistributedDataParallel(net.double())
    memory = MemoryWrapper(model, 8, (FEATURES,), distributed="sharded")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data, labels = dataset(8)
    # Step 2: rank 0 reads filled samples, rank 1 unfilled ones (it runs the model on no rows).
    plan = [[0, 1], [2, 3]], [[0, 1], [4, 5]], [[2, 3], [0, 1]]
    terms = []
    for step, batches in enumerate(plan):
        idx = torch.tensor(batches[rank])
        x = data[idx]
        logits = model(x)
        term = memory(idx, x, adversarial(x, step, rank), logits, labels[idx])
        loss = nn.functional.cross_entropy(logits, labels[idx]) + term
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        terms.append(term.item())
    params = torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()
    return {"terms": terms, "params": params}


def _compiled(rank: int, world_size: int) -> dict:
    num_samples = SIZES[world_size][0]
    model = mlp()
    compiled = torch.compile(model, backend="eager")
    memory = MemoryWrapper(compiled, num_samples, (FEATURES,), depth=DEPTH, distributed="sharded")
    return _train(memory, model, num_samples, world_size, rank, range(2))


def _worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),  # a deadlock fails the test instead of hanging it
    )
    try:
        results = {}
        for layout in LAYOUTS:
            for num_samples in SIZES[world_size]:
                memory = MemoryWrapper(
                    mlp(), num_samples, (FEATURES,), depth=DEPTH, distributed=layout
                )
                results[f"{layout}-{num_samples}"] = _train(
                    memory, memory.model, num_samples, world_size, rank, range(EPOCHS)
                )
            results[f"duplicates-{layout}"] = _duplicates(layout, rank, world_size)
            results[f"recall-{layout}"] = _recall(layout, rank, world_size)
        results["bad_call"] = _bad_call(rank, world_size)
        padded = SIZES[world_size][1]
        on_disk = MemoryWrapper(
            mlp(),
            padded,
            (FEATURES,),
            depth=DEPTH,
            distributed="sharded",
            storage_path=Path(out_dir) / "disk",
        )
        results["sharded-disk"] = _train(
            on_disk, on_disk.model, padded, world_size, rank, range(EPOCHS)
        )
        if world_size == 3:
            results["resharding"] = _resharding(rank, Path(out_dir))
        if world_size == 2:
            results["ddp"] = _ddp(rank)
            results["compiled"] = _compiled(rank, world_size)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        # Without it a rank can tear down its gloo threads while its peer is still in the last
        # collective, which aborts the process ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(world_size: int, folder: Path) -> list[dict]:
    init_file = folder / "init"  # a fresh file for every process group
    mp.spawn(_worker, args=(world_size, str(init_file), str(folder)), nprocs=world_size, join=True)
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(world_size)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    return _spawn(2, tmp_path_factory.mktemp("ws2"))


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory) -> tuple[list[dict], Path]:
    folder = tmp_path_factory.mktemp("ws3")
    return _spawn(3, folder), folder


@pytest.fixture(params=[2, 3], ids=["2ranks", "3ranks"])
def ranks(request) -> tuple[int, list[dict]]:
    if request.param == 2:
        return 2, request.getfixturevalue("two_ranks")
    return 3, request.getfixturevalue("three_ranks")[0]


# ---------------------------------------------------------------------- reference side


def reference_run(layout, num_samples, world_size, epochs, *, phases=None):
    """Per-rank terms and received bytes of a single process that sees every rank's batch.

    ``phases``: ``[(world_size, epochs), ...]`` to change the world size between epochs; the
    terms and bytes of the last phase are returned.
    """
    phases = phases or [(world_size, epochs)]
    data, labels = dataset(num_samples)
    reference = ReferenceMemory(mlp(), depth=DEPTH, beta_prime=2.0)
    for ws, phase_epochs in phases:
        terms = {rank: [] for rank in range(ws)}
        comm = {rank: [] for rank in range(ws)}
        for epoch in phase_epochs:
            per_rank = [rank_batches(num_samples, ws, rank, epoch) for rank in range(ws)]
            for step in range(len(per_rank[0])):
                batches = [per_rank[rank][step] for rank in range(ws)]
                advs = [adversarial(data[b], epoch, rank) for rank, b in enumerate(batches)]
                last_writer = {}
                for rank, batch in enumerate(batches):
                    for index in batch.tolist():
                        last_writer[index] = rank  # a later rank overwrites
                for rank, batch in enumerate(batches):
                    before = copy.copy(reference)
                    before.slots = dict(reference.slots)  # reading leaves the reference unchanged
                    x = data[batch]
                    terms[rank].append(
                        float(before(batch, x, advs[rank], before.model(x), labels[batch]))
                    )
                    comm[rank].append(
                        expected_bytes(layout, ws, rank, batches, last_writer, reference)
                    )
                everyone = torch.cat(batches)
                x = data[everyone]
                reference(everyone, x, torch.cat(advs), reference.model(x), labels[everyone])
    return terms, comm, reference


def expected_bytes(layout, world_size, rank, batches, last_writer, reference) -> int:
    """Payload bytes rank ``rank`` receives from the others in one call, counted by hand."""
    others = world_size - 1
    longest = max(len(b) for b in batches)
    metadata = others * 2 * 8 + others * longest * 8 + others * longest * 1
    if layout == "sharded":
        read = sum(
            len(reference.slots.get(i, []))
            for i in batches[rank].tolist()
            if i % world_size != rank
        )
        written = sum(1 for i, w in last_writer.items() if i % world_size == rank and w != rank)
    else:
        read = 0
        written = sum(1 for w in last_writer.values() if w != rank)
    return metadata + (read + written) * ROW_BYTES


# ---------------------------------------------------------------------- tests


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("which", [0, 1], ids=["even", "padded"])
def test_every_rank_term_equals_the_single_process_reference(ranks, layout, which):
    world_size, results = ranks
    num_samples = SIZES[world_size][which]
    expected, _, reference = reference_run(layout, num_samples, world_size, range(EPOCHS))
    for rank in range(world_size):
        got = results[rank][f"{layout}-{num_samples}"]["terms"]
        assert len(got) == len(expected[rank])
        assert got == pytest.approx(expected[rank], rel=1e-6, abs=1e-12), f"rank {rank}"
    assert any(t > 0 for t in expected[0])  # the comparison covers computed terms
    filled = sum(len(v) for v in reference.slots.values()) / (num_samples * DEPTH)
    for rank in range(world_size):
        assert results[rank][f"{layout}-{num_samples}"]["stats"]["filled_fraction"] == filled


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("which", [0, 1], ids=["even", "padded"])
def test_received_bytes_per_step_match_the_count_by_hand(ranks, layout, which):
    world_size, results = ranks
    num_samples = SIZES[world_size][which]
    _, expected, _ = reference_run(layout, num_samples, world_size, range(EPOCHS))
    for rank in range(world_size):
        result = results[rank][f"{layout}-{num_samples}"]
        assert result["comm"] == expected[rank], f"rank {rank}"
        assert result["stats"]["comm_bytes_total"] == sum(expected[rank])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_rank_holds_its_share_of_samples(ranks, layout):
    world_size, results = ranks
    for num_samples in SIZES[world_size]:
        for rank in range(world_size):
            owned = len([i for i in range(num_samples) if i % world_size == rank])
            want = owned if layout == "sharded" else num_samples
            assert results[rank][f"{layout}-{num_samples}"]["local_rows"] == want


@pytest.mark.parametrize("layout", LAYOUTS)
def test_same_step_duplicates_keep_the_highest_rank_accepted_row(ranks, layout):
    world_size, results = ranks
    sample0 = [0.1 * world_size] * FEATURES  # the highest rank wrote it last
    sample1 = [0.2 + 0.1 * (world_size - 2)] * FEATURES  # the highest rank's row was NaN
    for rank in range(world_size):
        result = results[rank][f"duplicates-{layout}"]
        slots = result["slots"]
        if layout == "replicated":
            assert slots[0] == pytest.approx(sample0) and slots[1] == pytest.approx(sample1)
        elif rank == 0:  # sharded: sample 0 lives on rank 0, sample 1 on rank 1
            assert slots[0] == pytest.approx(sample0)
        elif rank == 1:
            assert slots[0] == pytest.approx(sample1)
        stats = result["stats"]
        assert stats["rejected_rows"] == (1 if rank == world_size - 1 else 0)
        assert stats["rows_rejected_all_ranks"] == 1
        assert stats["rows_accepted_all_ranks"] == 2 * world_size - 1
        assert stats["filled_fraction"] == 2 / 6


@pytest.mark.parametrize("layout", LAYOUTS)
def test_recall_gives_other_ranks_rows_and_the_call_exchanges_them_once(ranks, layout):
    world_size, results = ranks
    samples = 2 * world_size
    for rank in range(world_size):
        result = results[rank][f"recall-{layout}"]
        wanted = [(2 * rank + 2) % samples, (2 * rank + 3) % samples]
        assert result["found"] == [True, True]
        # Stored as float32: compare with the float32 rounding of what was written.
        assert result["start"] == [
            [float(torch.tensor(0.01 * i).float())] * FEATURES for i in wanted
        ]
        # A plain call: 3 gathers (header, indices, flags) and 2 row exchanges for sharded (read,
        # write) or 1 (write) for replicated. Recall + call: the same, nothing twice.
        gathers, row_exchanges = 3, (2 if layout == "sharded" else 1)
        assert result["counts"] == {"gathers": gathers, "rows": row_exchanges}
        # Every rank knows every rank's fooled-at-write flags: even samples fooled, odd not; the
        # second call rewrote every sample without logits: not known.
        assert result["fooled_first"] == [1 if i % 2 == 0 else 0 for i in range(samples)]
        assert result["fooled"] == [255] * samples


def test_a_sharded_memory_on_disk_gives_the_same_terms(ranks):
    world_size, results = ranks
    num_samples = SIZES[world_size][1]
    expected, _, _ = reference_run("sharded", num_samples, world_size, range(EPOCHS))
    for rank in range(world_size):
        result = results[rank]["sharded-disk"]
        assert result["terms"] == pytest.approx(expected[rank], rel=1e-6, abs=1e-12)
        assert result["local_rows"] == len(range(rank, num_samples, world_size))


def test_a_bad_call_on_one_rank_raises_on_every_rank_without_a_deadlock(ranks):
    world_size, results = ranks
    for rank in range(world_size):
        result = results[rank]["bad_call"]
        want = "IndexError" if rank == world_size - 1 else "RuntimeError"
        assert result["raised"] == want
        assert result["filled"] == 2 / 6  # only the good call after it was stored


def test_shards_saved_on_two_ranks_continue_on_three(three_ranks):
    results, folder = three_ranks
    num_samples = SIZES[3][1]
    phases = [(2, range(2)), (3, range(2, 4))]
    expected, _, reference = reference_run("sharded", num_samples, 3, None, phases=phases)
    for layout in LAYOUTS:
        for rank in range(3):
            got = results[rank]["resharding"][layout]
            assert got == pytest.approx(expected[rank], rel=1e-6, abs=1e-12)
    same_world, _, _ = reference_run("sharded", num_samples, 2, None, phases=[(2, range(4))])
    for rank in range(2):
        got = results[rank]["resharding"]["same_world"]
        assert got == pytest.approx(same_world[rank][-len(got) :], rel=1e-6, abs=1e-12)
        assert "merge_shard_states" in results[rank]["resharding"]["other_shard"]
    # The merged state also loads into a single-process memory (world size 1).
    merged = torch.load(folder / "merged.pt", weights_only=True)
    _, _, after_two_epochs = reference_run("sharded", num_samples, 2, range(2))
    single = MemoryWrapper(mlp(), num_samples, (FEATURES,), depth=DEPTH)
    single.load_state_dict(merged)
    slots = single.state_dict()["slots"]
    for index, stored in after_two_epochs.slots.items():
        for age, example in enumerate(stored):
            head = int(single.state_dict()["ring_head"][index])
            assert torch.equal(slots[index, (head - age) % DEPTH], example)
    assert reference.slots  # the reference itself was exercised


def test_ddp_wrapped_batchnorm_model_trains_in_step_on_every_rank(two_ranks):
    first, second = two_ranks[0]["ddp"], two_ranks[1]["ddp"]
    assert first["params"] == second["params"]  # DDP kept the replicas equal
    assert first["terms"][0] == 0.0 and first["terms"][1] > 0.0
    assert second["terms"][1] == 0.0  # its samples were never written: no rows, no hang
    assert all(math.isfinite(t) for t in first["terms"] + second["terms"])


def test_compiled_model_gives_the_eager_terms(two_ranks):
    expected, _, _ = reference_run("sharded", SIZES[2][0], 2, range(2))
    for rank in range(2):
        got = two_ranks[rank]["compiled"]["terms"]
        assert got == pytest.approx(expected[rank], rel=1e-6, abs=1e-12)


def test_merge_shard_states_rejects_an_incomplete_set():
    shard = {
        "slots": torch.zeros(2, 1, 1),
        "slot_count": torch.zeros(3, dtype=torch.int32),
        "ring_head": torch.zeros(3, dtype=torch.int32),
        "shard": {"rank": 0, "world_size": 2},
    }
    with pytest.raises(ValueError, match="every rank 0 to world_size - 1"):
        merge_shard_states([shard])


def test_distributed_memory_needs_an_initialized_process_group():
    with pytest.raises(ValueError, match="init_process_group"):
        MemoryWrapper(mlp(), 4, (FEATURES,), distributed="sharded")
    with pytest.raises(ValueError, match="distributed must be"):
        MemoryWrapper(mlp(), 4, (FEATURES,), distributed="ring")
