"""Forgetting diagnostics: fooled-at-write flags, classification of memory rows, the counters.

A linear two-class model with hand-set weights classifies by the sign of the first coordinate
minus 0.5, so the test places examples on either side of the boundary and knows every answer.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memloss_addon import MemoryWrapper
from tests.helpers import adversarial_stand_in, epoch_batches

N = 6


def boundary_model() -> nn.Linear:
    """Class 1 where x0 > 0.5, class 0 where x0 < 0.5 (logits 10 * (x0 - 0.5) and 0)."""
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0]]))
        model.bias.copy_(torch.tensor([0.0, -5.0]))
    return model


def point(x0: float) -> torch.Tensor:
    return torch.tensor([x0, 0.5])


LABELS = torch.tensor([1, 1, 1, 0, 0, 0])
CLEAN = torch.stack([point(v) for v in (0.9, 0.8, 0.7, 0.1, 0.2, 0.3)])


def test_fooled_at_write_is_recorded_from_the_adversarial_logits():
    model = boundary_model()
    memory = MemoryWrapper(model, N, (2,))
    # Samples 0, 1 and 3 cross the boundary (fooled); 2, 4 and 5 stay on their side.
    adv = torch.stack([point(v) for v in (0.4, 0.45, 0.6, 0.7, 0.3, 0.4)])
    idx = torch.arange(N)
    memory(idx, CLEAN, adv, model(CLEAN), LABELS, adv_logits=model(adv))
    assert memory.state_dict()["fooled_at_write"].tolist() == [1, 1, 0, 1, 0, 0]
    memory(idx, CLEAN, adv, model(CLEAN), LABELS)  # no logits: not known
    assert memory.state_dict()["fooled_at_write"].tolist() == [255] * N


def test_rows_read_are_classified_and_forgetting_and_recovery_counted():
    model = boundary_model()
    memory = MemoryWrapper(model, N, (2,), beta_prime=0.0, diagnostics=True)
    idx = torch.arange(N)
    adv = torch.stack([point(v) for v in (0.4, 0.45, 0.6, 0.7, 0.3, 0.4)])
    memory(idx, CLEAN, adv, model(CLEAN), LABELS, adv_logits=model(adv))
    # Now move the boundary to x0 = 0.55: the stored examples are judged by the new model.
    with torch.no_grad():
        model.bias.copy_(torch.tensor([0.0, -5.5]))
    # Predicted now: 0.4->0, 0.45->0, 0.6->1, 0.7->1, 0.3->0, 0.4->0.
    # correct now:   no,     no,      yes,    no,     yes,    yes   -> 3 correct of 6
    # fooled then:   yes,    yes,     no,     yes,    no,     no
    # forgotten (not fooled then, wrong now): none; recovered (fooled then, right now): none.
    memory(idx, CLEAN, adv, model(CLEAN), LABELS, adv_logits=model(adv))
    stats = memory.stats()
    assert stats["rows_classified"] == 6 and stats["rows_correct"] == 3
    assert stats["rows_seen_at_write"] == 6
    assert stats["rows_forgotten"] == 0 and stats["rows_recovered"] == 0
    assert stats["memory_accuracy"] == 0.5

    # Shift the boundary the other way (x0 = 0.42): 0.45 -> 1 (right: recovered),
    # 0.4 -> 0 stays wrong for sample 0; sample 5 (0.4, label 0) right; 0.3 right;
    # 0.6 and 0.7 -> 1: sample 2 right, sample 3 (label 0) wrong.
    with torch.no_grad():
        model.bias.copy_(torch.tensor([0.0, -4.2]))
    memory(idx, CLEAN, adv, model(CLEAN), LABELS)
    window = memory.epoch_stats()
    assert window["rows_classified"] == 12
    # Second read: correct = [no, yes, yes, no, yes, yes] -> 4; the slots then held the examples
    # stored with logits by the second call (fooled then under x0 = 0.55: yes, yes, no, yes,
    # no, no): recovered = sample 1; forgotten = none.
    assert stats["rows_correct"] + 4 == window["rows_correct"]
    assert window["rows_recovered"] == 1 and window["rows_forgotten"] == 0


def test_a_forgotten_example_is_counted():
    model = boundary_model()
    memory = MemoryWrapper(model, N, (2,), beta_prime=0.0, diagnostics=True)
    idx = torch.tensor([2])
    adv = point(0.56).unsqueeze(0)  # label 1, x0 = 0.56 > 0.5: not fooled when stored
    memory(idx, CLEAN[idx], adv, model(CLEAN[idx]), LABELS[idx], adv_logits=model(adv))
    with torch.no_grad():
        model.bias.copy_(torch.tensor([0.0, -6.0]))  # boundary at 0.6: now classified 0
    memory(idx, CLEAN[idx], adv, model(CLEAN[idx]), LABELS[idx])
    stats = memory.stats()
    assert (stats["rows_forgotten"], stats["rows_recovered"], stats["rows_correct"]) == (1, 0, 0)


class DropoutBatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3)
        )

    def forward(self, x):
        return self.body(x)


def train(memory_options: dict | None) -> tuple[list[float], dict, torch.Tensor]:
    """A plain training loop with dropout and BatchNorm; the memory term added when given."""
    torch.manual_seed(1)
    model = DropoutBatchNormNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = torch.rand(12, 3, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(12) % 3
    memory = None if memory_options is None else MemoryWrapper(model, 12, (3,), **memory_options)
    losses = []
    for epoch in range(3):
        for idx in epoch_batches(12, 4, epoch):
            x, y = data[idx], labels[idx]
            adv = adversarial_stand_in(x, epoch)
            logits = model(x)
            adv_logits = model(adv)
            loss = nn.functional.cross_entropy(logits, y) + nn.functional.cross_entropy(
                adv_logits, y
            )
            if memory is not None:
                loss = loss + memory(idx, x, adv, logits, y, adv_logits=adv_logits)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    if memory is not None:
        assert memory.stats()["rows_classified"] == 24  # epochs 2 and 3 read every sample
    return losses, model.state_dict(), torch.get_rng_state()


def test_beta_prime_zero_with_diagnostics_trains_bit_identically_to_no_memory():
    plain_losses, plain_state, plain_rng = train(None)
    losses, state, rng = train({"beta_prime": 0.0, "diagnostics": True})
    assert losses == plain_losses
    assert torch.equal(rng, plain_rng)
    for key, value in plain_state.items():
        assert torch.equal(state[key], value), key


def test_diagnostics_read_rows_that_replay_leaves_out():
    model = boundary_model()
    memory = MemoryWrapper(model, N, (2,), diagnostics=True, replay_fraction=0.5)
    idx = torch.arange(N)
    memory(idx, CLEAN, CLEAN, model(CLEAN), LABELS)
    memory(idx, CLEAN, CLEAN, model(CLEAN), LABELS)
    stats = memory.stats()
    assert stats["rows_classified"] == N and stats["rows_read"] == N // 2
    assert stats["rows_skipped"] == N // 2


@pytest.mark.parametrize("bad", [torch.zeros(N, 3), torch.zeros(N, 2, dtype=torch.long)])
def test_bad_adv_logits_are_refused(bad):
    model = boundary_model()
    memory = MemoryWrapper(model, N, (2,))
    with pytest.raises((TypeError, ValueError), match="adv_logits"):
        memory(torch.arange(N), CLEAN, CLEAN, model(CLEAN), LABELS, adv_logits=bad)
    assert memory.stats()["rows_written"] == 0
