"""Each storage dtype reads back within its error bound, with the projection it promises."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memloss_addon import MemoryWrapper

EPS = 8 / 255
SHAPE = (3, 8, 8)


def round_trip(**options) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stores adversarial examples, then reads the memory examples the model is run on."""
    seen = []

    class Spy(nn.Module):
        def forward(self, x):
            seen.append(x.detach().clone())
            return torch.zeros(x.shape[0], 2)

    generator = torch.Generator().manual_seed(5)
    clean = torch.rand(16, *SHAPE, generator=generator)
    delta = (torch.rand(16, *SHAPE, generator=generator) * 2 - 1) * EPS
    adv = (clean + delta).clamp(0, 1)
    memory = MemoryWrapper(Spy(), 16, SHAPE, **options)
    targets = torch.zeros(16, dtype=torch.long)
    memory(torch.arange(16), clean, adv, torch.zeros(16, 2), targets)
    memory(torch.arange(16), clean, adv, torch.zeros(16, 2), targets)
    return clean, adv, seen[0]


@pytest.mark.parametrize(
    ("dtype", "bound"),
    [(torch.float32, 0.0), (torch.float16, 2.0**-11), (torch.bfloat16, 2.0**-8)],
)
def test_float_examples_within_their_rounding_bound(dtype, bound):
    _, adv, read = round_trip(dtype=dtype)
    # Values in [0, 1]: the relative rounding error of the format bounds the absolute one.
    assert (read - adv).abs().max() <= bound


def test_uint8_examples_are_on_the_grid_within_half_a_step():
    _, adv, read = round_trip(dtype=torch.uint8)
    assert (read - adv).abs().max() <= 0.5 / 255 + 1e-7
    on_grid = read * 255
    assert torch.allclose(on_grid, on_grid.round(), atol=1e-4)


def test_uint8_with_eps_is_projected_into_the_ball_of_the_clean_input():
    clean, adv, read = round_trip(dtype=torch.uint8, eps=EPS)
    assert (read - clean).abs().max() <= EPS + 1e-7
    assert read.min() >= 0 and read.max() <= 1
    assert (read - adv).abs().max() <= 0.5 / 255 + 1e-7


def test_uint8_clamps_out_of_range_values_instead_of_wrapping():
    seen = []

    class Spy(nn.Module):
        def forward(self, x):
            seen.append(x.detach().clone())
            return torch.zeros(x.shape[0], 2)

    memory = MemoryWrapper(Spy(), 1, (3,), dtype=torch.uint8)
    adv = torch.tensor([[-1.0, 1.5, 0.4]])
    for _ in range(2):
        memory(torch.tensor([0]), torch.zeros(1, 3), adv, torch.zeros(1, 2), torch.tensor([0]))
    torch.testing.assert_close(seen[0], torch.tensor([[0.0, 1.0, 102 / 255]]), atol=1e-7, rtol=0)


def test_int8_perturbation_within_half_a_step_of_eps_over_127():
    clean, adv, read = round_trip(dtype=torch.int8, mode="perturbation", eps=EPS)
    assert (read - adv).abs().max() <= EPS / 254 + 1e-6
    assert (read - clean).abs().max() <= EPS + 1e-6
    assert read.min() >= 0 and read.max() <= 1


def test_perturbation_is_replayed_on_the_current_clean_input():
    seen = []

    class Spy(nn.Module):
        def forward(self, x):
            seen.append(x.detach().clone())
            return torch.zeros(x.shape[0], 2)

    memory = MemoryWrapper(Spy(), 2, (2,), mode="perturbation")
    first_clean = torch.tensor([[0.2, 0.5], [0.5, 0.5]])
    first_adv = torch.tensor([[0.3, 0.4], [0.45, 0.55]])  # deltas (0.1, -0.1) and (-0.05, 0.05)
    targets = torch.zeros(2, dtype=torch.long)
    memory(torch.tensor([0, 1]), first_clean, first_adv, torch.zeros(2, 2), targets)
    new_clean = torch.tensor([[0.95, 0.05], [0.0, 0.5]])  # another augmented view
    memory(torch.tensor([0, 1]), new_clean, new_clean, torch.zeros(2, 2), targets)
    expected = torch.tensor([[1.0, 0.0], [0.0, 0.55]])  # clip(new_clean + delta, 0, 1)
    torch.testing.assert_close(seen[0], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("dtype", "mode", "eps", "bytes_per_value"),
    [
        (torch.float32, "example", None, 4),
        (torch.float16, "example", None, 2),
        (torch.bfloat16, "example", None, 2),
        (torch.uint8, "example", None, 1),
        (torch.int8, "perturbation", EPS, 1),
    ],
)
def test_nbytes_matches_the_estimate_and_the_dtype(dtype, mode, eps, bytes_per_value):
    memory = MemoryWrapper(nn.Identity(), 100, SHAPE, depth=2, dtype=dtype, mode=mode, eps=eps)
    slots = 100 * 2 * 3 * 8 * 8 * bytes_per_value
    # per sample: int32 ring head and fill count; per slot: float32 last weight, uint8 fooled flag
    bookkeeping = 100 * 8 + 100 * 2 * 5
    assert memory.nbytes == slots + bookkeeping
    assert MemoryWrapper.estimate_nbytes(100, SHAPE, depth=2, dtype=dtype) == memory.nbytes
