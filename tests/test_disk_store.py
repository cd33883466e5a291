"""A memory kept in a folder on disk: same rows and terms as in RAM, small anonymous memory,
and reopened after a restart with its bookkeeping."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
import torch
from torch import nn

from memloss_addon import MemoryWrapper
from tests.conftest import requires_cuda
from tests.helpers import ReferenceMemory, mlp, run_epochs

N, FEATURES = 10, 4
# The data run_epochs feeds: float64 inputs of seed 3, labels i % 3, batches of 4.
EPOCH_DATA = {
    "num_samples": N,
    "sample_shape": (FEATURES,),
    "classes": 3,
    "batch_size": 4,
    "data_seed": 3,
    "dtype": torch.float64,
}


def test_terms_equal_the_loop_reference(tmp_path):
    model = mlp()
    memory = MemoryWrapper(model, N, (FEATURES,), depth=2, storage_path=tmp_path / "memory")
    reference = ReferenceMemory(model, depth=2, beta_prime=2.0)
    assert run_epochs(memory, range(3), **EPOCH_DATA) == pytest.approx(
        run_epochs(reference, range(3), **EPOCH_DATA), rel=1e-6, abs=1e-12
    )
    assert (tmp_path / "memory" / "rows.bin").stat().st_size == N * 2 * FEATURES * 4


def test_uint8_rows_read_back_as_written(tmp_path):
    memory = MemoryWrapper(
        nn.Linear(6, 2), 300, (2, 3), dtype=torch.uint8, storage_path=tmp_path, beta_prime=0.0
    )
    generator = torch.Generator().manual_seed(0)
    levels = torch.randint(0, 256, (300, 2, 3), generator=generator)
    # At most 0.4 of a step off the grid (beyond [0, 1] at the ends): each rounds to its level.
    values = (levels + torch.rand(300, 2, 3, generator=generator) * 0.8 - 0.4) / 255
    for start in range(0, 300, 64):
        idx = torch.arange(start, min(start + 64, 300)).flip(0)  # not in file order
        x = values[idx]
        memory(idx, x, x, torch.zeros(len(idx), 2), torch.zeros(len(idx), dtype=torch.long))
    stored = memory.state_dict()["slots"][:, 0]
    assert torch.equal(stored, levels.to(torch.uint8))
    assert memory.stats()["filled_fraction"] == 1.0


def test_reopened_after_a_restart_with_its_bookkeeping(tmp_path):
    folder = tmp_path / "memory"
    # A separate process fills two epochs and exits; this process continues from the folder.
    script = textwrap.dedent(
        f"""
        import torch
        from memloss_addon import MemoryWrapper
        from tests.helpers import mlp, run_epochs
        from tests.test_disk_store import EPOCH_DATA
        model = mlp()
        memory = MemoryWrapper(model, {N}, ({FEATURES},), depth=3, storage_path={str(folder)!r})
        run_epochs(memory, range(2), **EPOCH_DATA)
        memory.store.flush()
        """
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", script], check=True, cwd=root, timeout=120)
    model = mlp()
    reopened = MemoryWrapper(model, N, (FEATURES,), depth=3, storage_path=folder)
    reference = ReferenceMemory(model, depth=3, beta_prime=2.0)
    run_epochs(reference, range(2), **EPOCH_DATA)
    assert reopened.stats()["filled_fraction"] == 2 / 3  # two of three slots of every sample
    state = reopened.state_dict()
    assert state["slot_count"].tolist() == [2] * N
    assert state["ring_head"].tolist() == [1] * N  # slots 0 then 1 were written
    assert run_epochs(reopened, range(2, 5), **EPOCH_DATA) == pytest.approx(
        run_epochs(reference, range(2, 5), **EPOCH_DATA), rel=1e-6, abs=1e-12
    )


def test_a_folder_of_another_configuration_is_refused(tmp_path):
    MemoryWrapper(mlp(), N, (FEATURES,), storage_path=tmp_path)
    with pytest.raises(ValueError, match="does not match"):
        MemoryWrapper(mlp(), N, (FEATURES,), dtype=torch.float16, storage_path=tmp_path)
    with pytest.raises(ValueError, match="does not match"):
        MemoryWrapper(mlp(), N + 1, (FEATURES,), storage_path=tmp_path)


def test_an_unfinished_folder_is_created_afresh(tmp_path):
    (tmp_path / "rows.bin").write_bytes(b"\xff" * 7)  # no meta.json: a creation that was cut off
    memory = MemoryWrapper(mlp(), N, (FEATURES,), storage_path=tmp_path)
    assert memory.stats()["filled_fraction"] == 0.0
    assert not bool(memory.state_dict()["slots"].any())


def test_a_folder_of_an_earlier_version_gets_its_checksums_and_journal(tmp_path):
    memory = MemoryWrapper(mlp(), N, (FEATURES,), depth=2, storage_path=tmp_path)
    run_epochs(memory, range(2), **EPOCH_DATA)
    before = memory.state_dict()["slots"].clone()
    del memory
    for name in ("checks.bin", "journal.bin", "undo-0.bin", "undo-1.bin"):  # not made before
        (tmp_path / name).unlink()
    reopened = MemoryWrapper(mlp(), N, (FEATURES,), depth=2, storage_path=tmp_path)
    assert torch.equal(reopened.state_dict()["slots"], before)
    assert reopened.stats()["filled_fraction"] == 1.0
    by_hand = [zlib.crc32(row.numpy().tobytes()) for row in before.reshape(N * 2, FEATURES)]
    assert reopened.store.journal.checks.tolist() == by_hand
    assert all((tmp_path / name).exists() for name in ("journal.bin", "undo-0.bin", "undo-1.bin"))


def test_a_truncated_rows_file_is_refused(tmp_path):
    MemoryWrapper(mlp(), N, (FEATURES,), storage_path=tmp_path)
    with open(tmp_path / "rows.bin", "r+b") as handle:
        handle.truncate(12)
    with pytest.raises(ValueError, match="rows.bin has 12 bytes"):
        MemoryWrapper(mlp(), N, (FEATURES,), storage_path=tmp_path)


def test_state_dict_round_trip_into_ram_and_back(tmp_path):
    model = mlp()
    on_disk = MemoryWrapper(model, N, (FEATURES,), depth=2, storage_path=tmp_path)
    run_epochs(on_disk, range(2), **EPOCH_DATA)
    in_ram = MemoryWrapper(model, N, (FEATURES,), depth=2)
    in_ram.load_state_dict(on_disk.state_dict())
    second = MemoryWrapper(model, N, (FEATURES,), depth=2, storage_path=tmp_path / "copy")
    second.load_state_dict(in_ram.state_dict())
    assert run_epochs(second, range(2, 4), **EPOCH_DATA) == run_epochs(
        on_disk, range(2, 4), **EPOCH_DATA
    )


def test_bad_storage_arguments_raise():
    with pytest.raises(ValueError, match="device='cpu'"):
        MemoryWrapper(mlp(), N, (FEATURES,), storage_path="/tmp/unused", device="cuda")
    with pytest.raises(TypeError, match="storage_path"):
        MemoryWrapper(mlp(), N, (FEATURES,), storage_path=3)


def _rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    pytest.skip("/proc/self/status has no RssAnon")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_filling_stays_out_of_anonymous_memory(tmp_path):
    shape, num_samples, batch = (3, 32, 32), 16_000, 500  # 49 MB of uint8 rows
    memory = MemoryWrapper(
        nn.Flatten(), num_samples, shape, dtype=torch.uint8, storage_path=tmp_path, beta_prime=0.0
    )
    x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(0))
    logits, targets = torch.zeros(batch, 1), torch.zeros(batch, dtype=torch.long)
    before = _rss_anon()
    for start in range(0, num_samples, batch):
        memory(torch.arange(start, start + batch), x, x, logits, targets)
    growth = _rss_anon() - before
    assert memory.nbytes >= num_samples * 3 * 32 * 32
    assert growth < 16e6, f"anonymous memory grew by {growth / 1e6:.1f} MB for a 49 MB memory"
    expected = x[-1].clamp(0, 1).mul(255).round().to(torch.uint8)
    assert torch.equal(memory.state_dict()["slots"][num_samples - 1, 0], expected)


@requires_cuda
def test_reads_to_cuda_equal_reads_to_cpu(tmp_path):
    model = mlp()
    on_disk = MemoryWrapper(model, N, (FEATURES,), depth=2, storage_path=tmp_path)
    run_epochs(on_disk, range(2), **EPOCH_DATA)
    idx = torch.arange(N)
    x = torch.rand(N, FEATURES, dtype=torch.float64)
    cpu = on_disk.store.read(idx, x).examples
    cuda = on_disk.store.read(idx, x.cuda()).examples
    assert torch.equal(cuda.cpu(), cpu)
