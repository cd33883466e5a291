"""Faults of a disk-backed memory, each provoked: a disk too small or filling up, a file size
limit, a process killed part-way through a write or a load, a power loss that tore a row.

The promised outcomes: an ``OSError`` naming the folder, the bytes needed and the bytes free,
raised by the constructor with nothing left behind; never a SIGBUS; a reopened memory that holds
only rows written whole (a write interrupted by a kill is undone whole); a folder whose load was
interrupted is refused.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from memloss_addon import MemoryWrapper
from memloss_addon.store import disk, journal, space
from memloss_addon.store.journal import row_checks
from tests.helpers import adversarial_stand_in, epoch_batches, mlp

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
N, FEATURES, BATCH = 12, 4, 4
ROW_BYTES = FEATURES * 4  # float32 rows


def run_child(script: str, *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=ENV,
        timeout=timeout,
    )


def folder_bytes(*, num_samples: int, row_bytes: int, depth: int = 1) -> dict[str, int]:
    """What a storage folder allocates, counted by hand from the layout in docs/scale.md."""
    rows = num_samples * depth
    log = 4096 + min(rows, 256) * (row_bytes + 64)
    return {
        "rows.bin": rows * row_bytes,
        "ring.bin": num_samples * 8,  # int32 fill count and ring head per sample
        "slot_info.bin": rows * 5,  # float32 last weight and uint8 fooled flag per slot
        "checks.bin": rows * 4,  # a CRC-32 per row
        "journal.bin": 4096,
        "undo-0.bin": log,
        "undo-1.bin": log,
    }


# ---------------------------------------------------------------------- disk space


@pytest.fixture
def small_filesystem(tmp_path):
    """An 8 MiB tmpfs mounted for the test (root only), or a clean skip where it cannot be."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.name != "posix" or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_memory_larger_than_its_disk_is_an_oserror_before_training(small_filesystem):
    # The case: 10,000 uint8 CIFAR rows (31 MB) on an 8 MB file system used to die of
    # SIGBUS after 2,500 rows. Now the constructor says so, before anything is trained.
    folder = small_filesystem / "memory"
    free = os.statvfs(small_filesystem).f_bavail * os.statvfs(small_filesystem).f_frsize
    needed = sum(folder_bytes(num_samples=10_000, row_bytes=3 * 32 * 32).values())
    with pytest.raises(OSError) as raised:
        MemoryWrapper(nn.Flatten(), 10_000, (3, 32, 32), dtype=torch.uint8, storage_path=folder)
    message = str(raised.value)
    assert raised.value.errno == errno.ENOSPC
    assert repr(str(folder)) in message
    assert f"needs {needed:,} bytes" in message and f"{free:,} bytes free" in message
    assert not folder.exists()  # made by the constructor, so removed again
    assert os.listdir(small_filesystem) == []


def test_a_failed_allocation_leaves_nothing_a_later_open_would_trust(small_filesystem, monkeypatch):
    folder = small_filesystem / "memory"
    folder.mkdir()  # the user's folder: kept, emptied
    # With the free space unknown beforehand (no statvfs), the allocation itself fails part-way.
    monkeypatch.setattr(disk, "free_bytes", lambda folder: None)
    with pytest.raises(OSError, match="cannot hold the memory") as raised:
        MemoryWrapper(nn.Flatten(), 3_000, (3, 32, 32), dtype=torch.uint8, storage_path=folder)
    assert raised.value.errno == errno.ENOSPC
    assert os.listdir(folder) == []
    monkeypatch.undo()
    # A memory that fits is then created afresh in the same folder.
    memory = MemoryWrapper(nn.Flatten(), 500, (3, 32, 32), dtype=torch.uint8, storage_path=folder)
    assert memory.stats()["filled_fraction"] == 0.0


FULL_DISK = """
    import os, sys, torch
    from torch import nn
    from memloss_addon import MemoryWrapper
    folder, how = sys.argv[1], sys.argv[2]
    if how == "written-out":
        del os.posix_fallocate  # the fallback of platforms without it
    shape, num_samples = (3, 32, 32), 1_000  # 3 MB of uint8 rows on an 8 MB tmpfs
    memory = MemoryWrapper(nn.Flatten(), num_samples, shape, dtype=torch.uint8,
                           storage_path=os.path.join(folder, "memory"), beta_prime=0.0)
    with open(os.path.join(folder, "filler"), "wb") as filler:  # another job fills the disk
        try:
            while True:
                filler.write(bytes(1 << 16))
                filler.flush()
        except OSError:
            pass
    stats = os.statvfs(folder)
    print("free", stats.f_bavail * stats.f_frsize, flush=True)
    x = torch.rand(num_samples, *shape, generator=torch.Generator().manual_seed(0))
    targets = torch.zeros(num_samples, dtype=torch.long)
    for epoch in range(2):  # every row written twice through the mapping
        for start in range(0, num_samples, 100):
            idx = torch.arange(start, start + 100)
            adv = (x[idx] + 0.01 * epoch).clamp(0, 1)
            memory(idx, x[idx], adv, torch.zeros(100, 2), targets[idx])
    print("trained", memory.stats()["rows_written"], flush=True)
    before = memory.state_dict()["slots"].clone()
    try:  # 600 rows: more than its undo log was allocated for, on a full disk
        memory(torch.arange(600), x[:600], x[:600], torch.zeros(600, 2), targets[:600])
        print("no error")
    except OSError as error:
        print("oserror", error.errno, str(error).replace(chr(10), " "), flush=True)
    print("unchanged", bool(torch.equal(memory.state_dict()["slots"], before)), flush=True)
"""


@pytest.mark.parametrize("how", ["fallocate", "written-out"])
def test_a_disk_that_fills_up_during_training_never_ends_in_sigbus(small_filesystem, how):
    done = run_child(FULL_DISK, str(small_filesystem), how)
    assert done.returncode == 0, f"exit status {done.returncode} (SIGBUS is -7)\n{done.stderr}"
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert int(lines["free"]) < 1 << 16  # the file system was full while training
    assert lines["trained"] == "2000"
    code, message = lines["oserror"].split(" ", 1)
    assert int(code) == errno.ENOSPC and "undo log" in message and "bytes free" in message
    assert lines["unchanged"] == "True"  # the refused write changed nothing
    expected = torch.rand(1_000, 3, 32, 32, generator=torch.Generator().manual_seed(0)) + 0.01
    expected = expected.clamp(0, 1).mul(255).round().to(torch.uint8)
    reopened = MemoryWrapper(
        nn.Flatten(),
        1_000,
        (3, 32, 32),
        dtype=torch.uint8,
        storage_path=small_filesystem / "memory",
    )
    assert torch.equal(reopened.state_dict()["slots"][:, 0], expected)


FILE_SIZE_LIMIT = """
    import json, os, resource, sys, torch
    from torch import nn
    from memloss_addon import MemoryWrapper
    folder = sys.argv[1]
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, hard))
    result = {}
    try:
        MemoryWrapper(nn.Flatten(), 1_000, (3, 32, 32), dtype=torch.uint8,
                      storage_path=os.path.join(folder, "big"))
    except OSError as error:
        result["errno"], result["message"] = error.errno, str(error)
    result["left"] = os.path.exists(os.path.join(folder, "big"))
    small = MemoryWrapper(nn.Flatten(), 100, (3, 32, 32), dtype=torch.uint8,
                          storage_path=os.path.join(folder, "small"), beta_prime=0.0)
    x = torch.rand(100, 3, 32, 32)
    small(torch.arange(100), x, x, torch.zeros(100, 2), torch.zeros(100, dtype=torch.long))
    result["filled"] = small.stats()["filled_fraction"]
    print(json.dumps(result))
"""


def test_a_full_disk_halfway_through_a_write_undoes_it_and_raises(tmp_path, monkeypatch):
    memory = MemoryWrapper(mlp(), N, (FEATURES,), storage_path=tmp_path / "memory")
    x = data()
    idx = torch.arange(N)
    memory(idx, x, adversarial_stand_in(x, 0), memory.model(x), idx % 3)
    state = memory.state_dict()
    before = {key: value.clone() for key, value in state.items() if torch.is_tensor(value)}
    # Room in the undo log for this write's rows only: logging its bookkeeping needs more
    # space, after the rows have been stored.
    rows_chunk = 32 + N * 8 + N * 4 + N * ROW_BYTES  # header, indices, checksums, rows
    memory.store.journal._capacity = [rows_chunk, rows_chunk]

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(journal, "allocate", disk_full)
    undone = []
    real_undo = journal.Journal._undo_current
    monkeypatch.setattr(
        journal.Journal, "_undo_current", lambda self: (undone.append(1), real_undo(self))
    )
    with pytest.raises(OSError, match="cannot hold the undo log of this write"):
        memory(idx, x, adversarial_stand_in(x, 1), memory.model(x), idx % 3)
    assert undone == [1]  # the rows had been stored when the disk was found full
    for key, value in before.items():  # the stored rows were taken back
        assert torch.equal(memory.state_dict()[key], value), key
    assert memory.store.journal.header.state == journal.IDLE


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="needs RLIMIT_FSIZE (POSIX)")
def test_a_file_size_limit_is_an_oserror_naming_it(tmp_path):
    done = run_child(FILE_SIZE_LIMIT, str(tmp_path))
    assert done.returncode == 0, f"exit status {done.returncode} (SIGXFSZ is -25)\n{done.stderr}"
    result = json.loads(done.stdout)
    assert result["errno"] == errno.EFBIG
    assert "RLIMIT_FSIZE" in result["message"] and "1,000,000 bytes" in result["message"]
    needed = sum(folder_bytes(num_samples=1_000, row_bytes=3072).values())
    assert f"needs {needed:,} bytes" in result["message"]
    assert result["left"] is False
    assert result["filled"] == 1.0  # a memory under the limit works


@pytest.mark.parametrize("fallocate", ["posix_fallocate", "missing", "unsupported"])
def test_every_file_is_allocated_in_full(tmp_path, monkeypatch, fallocate):
    if fallocate == "missing":
        monkeypatch.delattr(os, "posix_fallocate", raising=False)
    elif fallocate == "unsupported":

        def unsupported(*args):
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")

        monkeypatch.setattr(os, "posix_fallocate", unsupported, raising=False)
    MemoryWrapper(mlp(), N, (FEATURES,), depth=2, storage_path=tmp_path / "memory")
    sizes = folder_bytes(num_samples=N, row_bytes=ROW_BYTES, depth=2)
    for name, size in sizes.items():
        stat = (tmp_path / "memory" / name).stat()
        assert stat.st_size == size, name
        assert stat.st_blocks * 512 >= size, f"{name} is sparse"


def test_a_copy_on_write_file_system_gets_a_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(disk, "copy_on_write_filesystem", lambda folder: "btrfs")
    with pytest.warns(RuntimeWarning, match=r"copy-on-write file system \(btrfs\).*SIGBUS"):
        MemoryWrapper(mlp(), N, (FEATURES,), storage_path=tmp_path / "memory")
    mounts = tmp_path / "mountinfo"  # the format of /proc/self/mountinfo
    mounts.write_text(
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        "40 22 8:2 / /data rw,relatime shared:2 - btrfs /dev/sda2 rw\n"
        "41 22 0:5 / /data/my\\040runs rw - zfs pool/runs rw\n"
    )
    kind = space.copy_on_write_filesystem
    assert kind("/home/me/memory", mountinfo=str(mounts)) is None
    assert kind("/data/memory", mountinfo=str(mounts)) == "btrfs"
    assert kind("/database", mountinfo=str(mounts)) is None  # not inside /data
    assert kind("/data/my runs/memory", mountinfo=str(mounts)) == "zfs"


# ---------------------------------------------------------------------- torn rows


def data() -> torch.Tensor:
    return torch.rand(N, FEATURES, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def stored_by_hand(depth: int) -> torch.Tensor:
    """The slots after epochs 0 .. depth - 1 of ``epoch_batches``: slot e holds epoch e's row."""
    x = data()
    return torch.stack([adversarial_stand_in(x, e) for e in range(depth)], dim=1).float()


KILLED_WRITER = """
    import os, signal, sys, torch
    from memloss_addon import MemoryWrapper
    from memloss_addon.store import disk, journal, slots
    from tests.helpers import adversarial_stand_in, epoch_batches, mlp
    from tests.test_disk_faults import BATCH, FEATURES, N, data
    folder, point, depth = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model, x = mlp(), data()
    memory = MemoryWrapper(model, N, (FEATURES,), depth=depth, storage_path=folder)

    def epoch(e):
        for idx in epoch_batches(N, BATCH, e):
            memory(idx, x[idx], adversarial_stand_in(x[idx], e), model(x[idx]), idx % 3)

    for e in range(depth):  # every slot filled
        epoch(e)

    def die():
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "mid-row":  # half the batch's rows, then half of a row that it changes
        real = disk._row_bytes
        class Tearing:
            def __init__(self, array):
                self.array = array
            def __setitem__(self, index, values):
                half = len(index) // 2
                self.array[index[:half]] = values[:half]
                for position in range(half, len(index)):  # a row whose change spans 2+ bytes
                    changed = (self.array[index[position]] != values[position]).nonzero()[0]
                    if len(changed) > 1:  # its bytes up to the first change, then stop
                        cut = changed[0] + 1
                        self.array[index[position], :cut] = values[position, :cut]
                        break
                die()
        target = memory.store.rows.data.data_ptr()
        disk._row_bytes = lambda t: Tearing(real(t)) if t.data_ptr() == target else real(t)
    elif point == "rows-written":  # every row stored, none of their checksums
        disk.row_checks = lambda rows: die()
    elif point == "mid-commit":  # one sample's ring head moved, nothing else
        def commit(self, plan, fooled=None, weight=None):
            self.ring_head.numpy()[int(plan.samples[0])] = int(plan.new_heads[0])
            die()
        slots.SlotRing.commit = commit
    elif point == "committed":  # rows, checksums and bookkeeping all stored, not marked done
        journal.Journal.end_write = lambda self: die()
    epoch(depth)  # killed in its first write
    print("not killed")
"""


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("point", ["mid-row", "rows-written", "mid-commit", "committed"])
def test_a_write_stopped_part_way_by_a_kill_is_undone_whole(tmp_path, point, depth):
    folder = tmp_path / "memory"
    done = run_child(KILLED_WRITER, str(folder), point, str(depth))
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr
    if point == "mid-row":  # the file really holds a torn row: neither the old nor the new one
        on_disk = torch.from_numpy(np.fromfile(folder / "rows.bin", dtype=np.float32))
        on_disk = on_disk.view(N, depth, FEATURES)
        new = adversarial_stand_in(data(), depth).float()
        torn = [
            i
            for i in range(N)
            if not torch.equal(on_disk[i], stored_by_hand(depth)[i])
            and not torch.equal(on_disk[i, 0], new[i])
        ]
        assert len(torn) == 1
    with pytest.warns(RuntimeWarning, match=rf"write of step {depth * 3 + 1} was interrupted"):
        reopened = MemoryWrapper(mlp(), N, (FEATURES,), depth=depth, storage_path=folder)
    state = reopened.state_dict()
    # Exactly the memory after the last complete call: no torn row, no half-made commit.
    assert torch.equal(state["slots"], stored_by_hand(depth))
    assert state["slot_count"].tolist() == [depth] * N
    assert state["ring_head"].tolist() == [depth - 1] * N
    assert reopened.step == depth * 3  # three batches an epoch
    rows = state["slots"].reshape(N * depth, -1).view(torch.uint8).numpy()
    assert np.array_equal(row_checks(rows), reopened.store.journal.checks)
    # The interrupted step, redone, gives what an uninterrupted memory stores.
    x = data()
    idx = epoch_batches(N, BATCH, depth)[0]
    reopened(idx, x[idx], adversarial_stand_in(x[idx], depth), reopened.model(x[idx]), idx % 3)
    newest = reopened.store.ring.plan_read(idx).store_rows[::depth].tolist()  # newest first
    got = reopened.state_dict()["slots"].reshape(N * depth, -1)[newest]
    assert torch.equal(got, adversarial_stand_in(x[idx], depth).float())


def test_a_power_loss_that_tore_a_row_is_found_on_the_next_boot(tmp_path, monkeypatch):
    # A power loss cannot be staged here; what it leaves can: rows written since the last flush
    # reach the disk in part, and the folder is reopened on another boot of the machine.
    folder = tmp_path / "memory"
    memory = MemoryWrapper(mlp(), N, (FEATURES,), depth=2, storage_path=folder, replay_fraction=0.5)
    x = data()
    for e in range(2):
        for idx in epoch_batches(N, BATCH, e):
            memory(idx, x[idx], adversarial_stand_in(x[idx], e), memory.model(x[idx]), idx % 3)
    del memory
    with open(folder / "rows.bin", "r+b") as rows:  # sample 5's newest row (slot 1), half torn
        rows.seek((5 * 2 + 1) * ROW_BYTES + ROW_BYTES // 2)
        rows.write(b"\x7f" * (ROW_BYTES // 2))
    monkeypatch.setattr(journal, "boot_id", lambda: "another-boot")
    with pytest.warns(RuntimeWarning, match=r"1 torn or lost row\(s\) were dropped, 23 kept"):
        reopened = MemoryWrapper(mlp(), N, (FEATURES,), depth=2, storage_path=folder)
    state = reopened.state_dict()
    expected = stored_by_hand(2)
    counts = [2] * N
    counts[5] = 1  # only its older, whole row is left, and it is now the newest
    assert state["slot_count"].tolist() == counts
    assert state["ring_head"].tolist() == [1] * 5 + [0] + [1] * (N - 6)
    assert torch.equal(state["slots"][5, 0], expected[5, 0])
    others = [i for i in range(N) if i != 5]
    assert torch.equal(state["slots"][others], expected[others])
    assert state["last_weight"].isinf().all()  # per-slot facts reset: not known any more
    assert (state["fooled_at_write"] == 255).all()
    with pytest.raises(ValueError, match="can return to steps 6 to 6 only"):
        reopened.rollback_to(5)


def test_a_distributed_folder_after_a_power_loss_is_refused(tmp_path, monkeypatch):
    layout = {"num_samples": 4, "rank": 0, "world_size": 2}
    options = {"num_samples": 4, "depth": 1, "row_shape": (2,), "dtype": torch.float32}
    rows, ring, _ = disk.open_disk_memory(tmp_path, layout=layout, staging=False, **options)
    rows.write(torch.tensor([1]), torch.tensor([[0.5, 1.0]]))
    ring.commit(ring.plan_write(torch.tensor([1]), torch.tensor([True])))
    monkeypatch.setattr(journal, "boot_id", lambda: "another-boot")
    with pytest.raises(ValueError, match="ranks' folders cannot be reconciled"):
        disk.open_disk_memory(tmp_path, layout=layout, staging=False, **options)


KILLED_LOAD = """
    import os, signal, sys, torch
    from memloss_addon import MemoryWrapper
    from memloss_addon.store import disk
    from tests.helpers import mlp
    from tests.test_disk_faults import FEATURES, N
    folder = sys.argv[1]
    memory = MemoryWrapper(mlp(), N, (FEATURES,), storage_path=folder)
    state = {**memory.state_dict(), "slots": torch.full((N, 1, FEATURES), 0.5)}
    state["slot_count"] = torch.ones(N, dtype=torch.int32)
    disk._compute_checks = lambda rows, checks: os.kill(os.getpid(), signal.SIGKILL)
    memory.load_state_dict(state)  # killed once the rows are copied, before the bookkeeping
"""


def test_a_folder_whose_load_was_interrupted_is_refused(tmp_path):
    done = run_child(KILLED_LOAD, str(tmp_path / "memory"))
    assert done.returncode == -signal.SIGKILL, done.stderr
    with pytest.raises(ValueError, match="a load into this memory was interrupted"):
        MemoryWrapper(mlp(), N, (FEATURES,), storage_path=tmp_path / "memory")
