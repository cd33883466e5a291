"""Selective replay (``replay_fraction``): which memory rows go through the model, and the term.

The selection and the term are recomputed here with plain loops in float64: weights by hand from
the model's logits, the top ``ceil(f * R)`` rows by a sort written in the test, the term with
``tests.helpers.memloss_row_by_hand``.
"""

from __future__ import annotations

import math

import pytest
import torch

from memloss_addon import MemoryWrapper
from tests.helpers import (
    adversarial_stand_in,
    log_softmax_by_hand,
    memloss_row_by_hand,
    mlp,
    run_epochs,
)

N, FEATURES, CLASSES, BETA = 10, 4, 3, 2.0


def data() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(N, FEATURES, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return x, torch.arange(N) % CLASSES


def difficulty(model, example: torch.Tensor, label: int) -> float:
    """1 - p_y of one example, by hand."""
    with torch.no_grad():
        return 1.0 - math.exp(float(log_softmax_by_hand(model(example.unsqueeze(0))[0])[label]))


def top_rows(weights: list[float], fraction: float) -> list[int]:
    """Positions of the ceil(f * R) largest weights, ties in order, returned in order."""
    keep = math.ceil(fraction * len(weights))
    ranked = sorted(range(len(weights)), key=lambda r: (-weights[r], r))
    return sorted(ranked[:keep])


def perturb(model) -> None:
    """Changes the model, so that a weight measured now differs from one measured before."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.sin(torch.arange(parameter.numel()).view_as(parameter)))


@pytest.mark.parametrize("fraction", [0.5, 0.25, 0.31])
def test_the_rows_with_the_largest_weight_at_write_are_replayed(fraction):
    model = mlp(FEATURES, CLASSES)
    memory = MemoryWrapper(model, N, (FEATURES,), beta_prime=BETA, replay_fraction=fraction)
    x, y = data()
    order = torch.tensor([3, 7, 0, 9, 1, 5, 2, 8, 4, 6])
    adv = adversarial_stand_in(x, 0)
    memory(order, x[order], adv[order], model(x[order]), y[order], adv_logits=model(adv[order]))
    written = [difficulty(model, adv[i], int(y[i])) for i in order.tolist()]
    weight_at_write = dict(zip(order.tolist(), written, strict=True))

    perturb(model)  # the weights of the rows are now different from those recorded
    batch = torch.tensor([6, 2, 9, 4, 0, 8, 1, 3, 7, 5])
    chosen = top_rows([weight_at_write[i] for i in batch.tolist()], fraction)
    logits = model(x[batch])
    term = memory(batch, x[batch], adversarial_stand_in(x, 1)[batch], logits, y[batch])

    expected = torch.zeros((), dtype=torch.float64)
    for r in chosen:
        sample = int(batch[r])
        memory_logits = model(adv[sample].unsqueeze(0))[0]
        expected = expected + memloss_row_by_hand(logits[r], memory_logits, int(y[sample]))
    expected = expected * BETA / len(batch)
    torch.testing.assert_close(term.double(), expected, rtol=1e-6, atol=1e-9)
    stats = memory.stats()
    assert stats["rows_read"] == len(chosen)
    assert stats["rows_skipped"] == N - len(chosen)


def test_rows_never_seen_come_first_then_batch_order():
    model = mlp(FEATURES, CLASSES)
    memory = MemoryWrapper(model, N, (FEATURES,), beta_prime=BETA, replay_fraction=0.3)
    x, y = data()
    adv = adversarial_stand_in(x, 0)
    seen_rows = torch.tensor([0, 1, 2, 3, 4])  # stored with their logits: weights known
    memory(
        seen_rows,
        x[seen_rows],
        adv[seen_rows],
        model(x[seen_rows]),
        y[seen_rows],
        adv_logits=model(adv[seen_rows]),
    )
    unseen_rows = torch.tensor([5, 6, 7, 8, 9])  # stored without: never seen
    memory(unseen_rows, x[unseen_rows], adv[unseen_rows], model(x[unseen_rows]), y[unseen_rows])

    forward_sizes = []
    handle = model.register_forward_hook(lambda _m, i, _o: forward_sizes.append(i[0]))
    batch = torch.tensor([1, 8, 0, 6, 2, 9, 3, 5, 4, 7])
    memory(batch, x[batch], x[batch], model(x[batch]), y[batch])
    handle.remove()
    # ceil(0.3 * 10) = 3 rows: the first three never-seen samples in batch order (8, 6, 9).
    replayed = forward_sizes[-1]
    assert torch.equal(replayed, adv[[8, 6, 9]].float().double())  # stored as float32


def test_a_read_records_the_weight_it_measures_and_new_rows_come_first():
    """Depth 2: the slots a call reads keep the weight measured then; unseen rows lead next."""
    model = mlp(FEATURES, CLASSES)
    memory = MemoryWrapper(model, N, (FEATURES,), depth=2, beta_prime=BETA, replay_fraction=0.5)
    x, y = data()
    everyone = torch.arange(N)
    adv = [adversarial_stand_in(x, epoch) for epoch in range(3)]
    stored = [a.float().double() for a in adv]  # what a float32 memory gives back
    memory(everyone, x, adv[0], model(x), y, adv_logits=model(adv[0]))
    at_write = [difficulty(model, adv[0][i], int(y[i])) for i in range(N)]
    perturb(model)
    # Call 2 reads the first examples (slot 0 of each sample), replays the top half by their
    # weight at write, records the weight it measures for those, then stores the second
    # examples (slot 1) without logits: never seen.
    chosen = top_rows(at_write, 0.5)
    now = [difficulty(model, stored[0][i], int(y[i])) for i in range(N)]
    memory(everyone, x, adv[1], model(x), y)
    weights = memory.state_dict()["last_weight"].tolist()
    for i in range(N):
        expected = now[i] if i in chosen else at_write[i]
        assert weights[2 * i] == pytest.approx(expected, abs=1e-6)
        assert weights[2 * i + 1] == math.inf
    perturb(model)
    # Call 3: 20 rows, 10 replayed: the 10 never-seen second examples, in batch order.
    inputs = []
    handle = model.register_forward_hook(lambda _m, i, _o: inputs.append(i[0]))
    memory(everyone, x, adv[2], model(x), y)
    handle.remove()
    assert torch.equal(inputs[-1], stored[1])


def test_fraction_one_is_the_plain_term_bit_for_bit():
    data_options = {
        "num_samples": 12,
        "sample_shape": (FEATURES,),
        "classes": CLASSES,
        "batch_size": 5,
        "data_seed": 4,
        "dtype": torch.float64,
    }
    plain = MemoryWrapper(mlp(FEATURES, CLASSES), 12, (FEATURES,), depth=2)
    replay = MemoryWrapper(mlp(FEATURES, CLASSES), 12, (FEATURES,), depth=2, replay_fraction=1.0)
    assert run_epochs(plain, range(4), **data_options) == run_epochs(
        replay, range(4), **data_options
    )
    assert replay.stats()["rows_skipped"] == 0


@pytest.mark.parametrize(
    ("value", "error"),
    [(0.0, ValueError), (1.5, ValueError), (float("nan"), ValueError), ("half", TypeError)],
)
def test_a_bad_fraction_is_refused_by_name(value, error):
    with pytest.raises(error, match="replay_fraction"):
        MemoryWrapper(mlp(), N, (FEATURES,), replay_fraction=value)


def test_the_weights_survive_a_save_and_load(tmp_path):
    model = mlp(FEATURES, CLASSES)
    x, y = data()
    adv = adversarial_stand_in(x, 0)
    memory = MemoryWrapper(model, N, (FEATURES,), replay_fraction=0.5)
    memory(torch.arange(N), x, adv, model(x), y, adv_logits=model(adv))
    memory.save(tmp_path / "memory.bin")
    restored = MemoryWrapper(model, N, (FEATURES,), replay_fraction=0.5)
    restored.load(tmp_path / "memory.bin")
    expected = [difficulty(model, adv[i], int(y[i])) for i in range(N)]
    assert restored.state_dict()["last_weight"].tolist() == pytest.approx(expected, abs=1e-6)
    assert restored.state_dict()["fooled_at_write"].tolist() == [
        int(int(model(adv[i : i + 1]).argmax()) != int(y[i])) for i in range(N)
    ]
