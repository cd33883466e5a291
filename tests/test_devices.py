"""Placement: pinned CPU memory feeding CUDA batches, GPU-resident memory, and no `.cuda()` calls.

The CUDA tests skip cleanly on machines without a GPU.
"""

from __future__ import annotations

import pathlib
import re

import pytest
import torch
from torch import nn

from memloss_addon import MemoryWrapper
from tests.conftest import requires_cuda

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "memloss_addon"


def test_library_never_calls_cuda_directly():
    # The integrations package quotes upstream lines that call .cuda() in order to patch them.
    offenders = [
        f"{path.relative_to(PACKAGE)}:{number}"
        for path in PACKAGE.rglob("*.py")
        if "integrations" not in path.parts
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\.cuda\(\s*\)", line)
    ]
    assert offenders == []


def test_the_rows_of_a_cpu_memory_are_never_pinned():
    # Only the staging buffers of reads to CUDA are (see tests/test_gpu_path_cpu.py).
    memory = MemoryWrapper(nn.Identity(), 4, (2,))
    assert not memory.store.rows.data.is_pinned()
    assert memory.store.rows.pinned_staging is torch.cuda.is_available()


def run_steps(memory_device: str, batch_device: str, steps: int = 12, **options) -> list[float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5)).to(batch_device)
    memory = MemoryWrapper(model, 16, (6,), device=memory_device, **options)
    generator = torch.Generator().manual_seed(1)
    data = torch.rand(16, 6, generator=generator)
    labels = torch.randint(0, 5, (16,), generator=generator)
    terms = []
    for step in range(steps):
        idx = torch.randperm(16, generator=generator)[:8]
        x = data[idx].to(batch_device)
        adv = (x + 0.02 * (step + 1)).clamp(0, 1)
        term = memory(idx, x, adv, model(x), labels[idx].to(batch_device))
        assert term.device == x.device
        terms.append(term.item())
    return terms


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.uint8])
def test_pinned_cpu_memory_with_cuda_batches_matches_cpu(dtype):
    on_cpu = run_steps("cpu", "cpu", dtype=dtype)
    pinned = run_steps("cpu", "cuda", dtype=dtype)
    assert pinned == pytest.approx(on_cpu, rel=1e-4, abs=1e-6)


@requires_cuda
def test_staging_buffers_are_pinned_reused_and_counted():
    model = nn.Linear(6, 5).to("cuda")
    memory = MemoryWrapper(model, 16, (6,))
    rows = memory.store.rows
    assert not rows.data.is_pinned()
    x = torch.rand(8, 6, device="cuda")
    y = torch.zeros(8, dtype=torch.long, device="cuda")
    halves = [torch.arange(8), torch.arange(8, 16)]
    for idx in halves * 2:  # fills every sample, then reads 8 rows into each staging buffer
        memory(idx, x, x, model(x), y)
    buffers = rows._staging.buffers
    pointers = [buffer.data_ptr() for buffer in buffers]
    assert all(buffer.is_pinned() for buffer in buffers)
    for idx in halves * 2:
        memory(idx, x, x, model(x), y)
    assert [buffer.data_ptr() for buffer in rows._staging.buffers] == pointers
    # 8 rows of 24 bytes: each buffer locks a block of 256 bytes (and holds 10 rows).
    assert rows.nbytes == 16 * 24 + 2 * 256


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_gpu_memory_matches_cpu(dtype):
    options = {"dtype": dtype}
    if dtype == torch.int8:
        options.update(mode="perturbation", eps=0.1)
    assert run_steps("cuda", "cuda", **options) == pytest.approx(
        run_steps("cpu", "cpu", **options), rel=1e-4, abs=1e-6
    )


@requires_cuda
def test_cuda_indices_are_checked_on_the_host():
    memory = MemoryWrapper(nn.Identity(), 4, (2,), device="cuda")
    x = torch.rand(2, 2, device="cuda")
    with pytest.raises(IndexError, match=r"\[4\]"):
        memory(
            torch.tensor([0, 4], device="cuda"),
            x,
            x,
            x,
            torch.zeros(2, dtype=torch.long, device="cuda"),
        )
