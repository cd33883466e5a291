"""A memory aligned with crop-and-flip augmentation (``view_padding``): replayed on the same pixels.

Expected values come from a loop over pixels written here: each view pixel's place in the padded
frame, whether last epoch's view covered it, and what was stored there.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memloss_addon import MemoryWrapper
from tests.helpers import assert_unchanged, snapshot

B, C, H, W, PAD, CLASSES = 3, 2, 4, 5, 2, 3


def frame() -> torch.Tensor:
    """Clean padded images, the frame both epochs' views are cut from."""
    return torch.rand(B, C, H + 2 * PAD, W + 2 * PAD, generator=torch.Generator().manual_seed(0))


def cut(padded: torch.Tensor, offsets: list[tuple[int, int]], flips: list[bool]) -> torch.Tensor:
    """The views, pixel by pixel: view (i, j) is padded (r + i, c + j), mirrored if flipped."""
    out = torch.empty(B, C, H, W)
    for b, ((r, c), flip) in enumerate(zip(offsets, flips, strict=True)):
        for i in range(H):
            for j in range(W):
                out[b, :, i, j] = padded[b, :, r + i, c + (W - 1 - j if flip else j)]
    return out


def expected_replay(old, new, adv_old, x_new) -> torch.Tensor:
    """Each new-view pixel: last epoch's adversarial value where its view covered that padded
    pixel, the clean value elsewhere."""
    (old_offsets, old_flips), (new_offsets, new_flips) = old, new
    out = x_new.clone()
    for b in range(B):
        (r0, c0), f0 = old_offsets[b], old_flips[b]
        (r1, c1), f1 = new_offsets[b], new_flips[b]
        for i in range(H):
            for j in range(W):
                row, col = r1 + i, c1 + (W - 1 - j if f1 else j)
                i0, j0 = row - r0, col - c0
                if 0 <= i0 < H and 0 <= j0 < W:
                    out[b, :, i, j] = adv_old[b, :, i0, W - 1 - j0 if f0 else j0]
    return out


def as_view(offsets, flips):
    return torch.tensor(offsets, dtype=torch.int64), torch.tensor(flips)


OLD = ([(0, 0), (2, 1), (1, 4)], [False, True, False])
NEW = ([(1, 2), (0, 0), (1, 3)], [True, False, False])


class Spy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []
        self.linear = nn.Linear(C * H * W, CLASSES)

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.linear(x.flatten(1))


def store_old_epoch(memory: MemoryWrapper, padded: torch.Tensor) -> torch.Tensor:
    x_old = cut(padded, *OLD)
    step = torch.sign(torch.sin(37 * x_old)) * 0.05
    adv_old = (x_old + step).clamp(0, 1)
    idx, y = torch.arange(B), torch.arange(B) % CLASSES
    memory(idx, x_old, adv_old, memory.model(x_old), y, view=as_view(*OLD))
    return adv_old


def test_a_row_read_back_under_a_new_view_is_that_view_of_the_padded_example():
    padded = frame()
    memory = MemoryWrapper(Spy(), B, (C, H, W), mode="perturbation", view_padding=PAD)
    adv_old = store_old_epoch(memory, padded)
    x_new = cut(padded, *NEW)
    start, found = memory.recall(torch.arange(B), x_new, view=as_view(*NEW))
    assert bool(found.all())
    expected = expected_replay(OLD, NEW, adv_old, x_new)
    torch.testing.assert_close(start, expected, rtol=0, atol=1e-6)
    assert memory.state_dict()["slots"].shape == (B, 1, C, H + 2 * PAD, W + 2 * PAD)


def test_the_term_runs_the_model_on_the_aligned_examples():
    padded = frame()
    model = Spy()
    memory = MemoryWrapper(model, B, (C, H, W), mode="perturbation", view_padding=PAD)
    adv_old = store_old_epoch(memory, padded)
    x_new = cut(padded, *NEW)
    idx, y = torch.arange(B), torch.arange(B) % CLASSES
    model.inputs.clear()
    logits = model(x_new)
    term = memory(idx, x_new, x_new, logits, y, view=as_view(*NEW))
    assert float(term.detach()) > 0
    replayed = model.inputs[-1]
    torch.testing.assert_close(
        replayed, expected_replay(OLD, NEW, adv_old, x_new), rtol=0, atol=1e-6
    )


def test_the_same_view_replays_the_stored_examples_exactly():
    padded = frame()
    memory = MemoryWrapper(Spy(), B, (C, H, W), mode="perturbation", view_padding=PAD)
    adv_old = store_old_epoch(memory, padded)
    start, _ = memory.recall(torch.arange(B), cut(padded, *OLD), view=as_view(*OLD))
    torch.testing.assert_close(start, adv_old, rtol=0, atol=1e-6)


BAD = [
    ({}, {"view": None}, ValueError, "needs view="),
    ({}, {"view": (torch.zeros(B, 2, dtype=torch.int64),)}, ValueError, "needs view="),
    ({}, {"view": as_view([(9, 0)] * B, [False] * B)}, ValueError, "offsets must lie"),
    ({}, {"view": (torch.zeros(B, 2), torch.zeros(B, dtype=torch.bool))}, ValueError, "int64"),
]


@pytest.mark.parametrize(("options", "call", "error", "match"), BAD)
def test_a_bad_view_is_refused_and_changes_nothing(options, call, error, match):
    padded = frame()
    memory = MemoryWrapper(Spy(), B, (C, H, W), mode="perturbation", view_padding=PAD, **options)
    store_old_epoch(memory, padded)
    before = snapshot(memory)
    x = cut(padded, *NEW)
    with pytest.raises(error, match=match):
        memory(torch.arange(B), x, x, memory.model(x), torch.zeros(B, dtype=torch.long), **call)
    assert_unchanged(before, memory)


def test_view_padding_needs_perturbations_and_images():
    with pytest.raises(ValueError, match="mode='perturbation'"):
        MemoryWrapper(Spy(), B, (C, H, W), view_padding=PAD)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        MemoryWrapper(Spy(), B, (C * H * W,), mode="perturbation", view_padding=PAD)
    plain = MemoryWrapper(Spy(), B, (C, H, W))
    x = torch.rand(B, C, H, W)
    with pytest.raises(ValueError, match="view_padding"):
        plain(
            torch.arange(B),
            x,
            x,
            plain.model(x),
            torch.zeros(B, dtype=torch.long),
            view=as_view(*OLD),
        )
