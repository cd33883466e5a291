"""memory.save / memory.load: the documented file layout, atomic replacement, and refusal of every
file that is another format, damaged, truncated, forged or of another configuration."""

from __future__ import annotations

import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from memloss_addon import MemoryFileError, MemoryWrapper, atomic_write
from memloss_addon.store.file_format import read_header
from tests.conftest import requires_cuda
from tests.helpers import assert_unchanged, run_epochs, snapshot

N, SHAPE, CLASSES = 10, (1, 2, 3), 4
ROOT = Path(__file__).resolve().parents[1]
# The data run_epochs feeds: fixed inputs of seed 9, labels i % CLASSES, batches of 4.
EPOCH_DATA = {
    "num_samples": N,
    "sample_shape": SHAPE,
    "classes": CLASSES,
    "batch_size": 4,
    "data_seed": 9,
}


def make(*, num_samples: int = N, sample_shape: tuple = SHAPE, **options) -> MemoryWrapper:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, CLASSES))
    return MemoryWrapper(model, num_samples, sample_shape, **{"depth": 2, **options})


STORAGE = [
    pytest.param({"dtype": torch.float32}, id="float32"),
    pytest.param({"dtype": torch.float16, "depth": 3}, id="float16-depth3"),
    pytest.param({"dtype": torch.bfloat16, "mode": "perturbation"}, id="bfloat16-perturbation"),
    pytest.param({"dtype": torch.uint8, "eps": 8 / 255}, id="uint8"),
    pytest.param({"dtype": torch.int8, "mode": "perturbation", "eps": 8 / 255}, id="int8"),
]


@pytest.mark.parametrize("options", STORAGE)
def test_round_trip_restores_everything_and_continues_identically(tmp_path, options):
    original = make(**options)
    run_epochs(original, range(3), **EPOCH_DATA)
    original.save(tmp_path / "memory.bin")
    restored = make(**options)
    restored.load(tmp_path / "memory.bin")
    assert_unchanged(snapshot(original), restored)
    assert repr(restored.stats()) == repr(original.stats())
    assert run_epochs(restored, range(3, 5), **EPOCH_DATA) == run_epochs(
        original, range(3, 5), **EPOCH_DATA
    )
    assert_unchanged(snapshot(original), restored)
    assert os.listdir(tmp_path) == ["memory.bin"]  # no temporary file left behind


def test_file_layout_is_the_documented_one(tmp_path):
    memory = make(dtype=torch.float16, eps=0.25)
    run_epochs(memory, range(2), **EPOCH_DATA)
    memory.save(tmp_path / "memory.bin")
    data = (tmp_path / "memory.bin").read_bytes()

    magic, header_length = struct.unpack("<8sQ", data[:16])
    assert magic == b"\x93MEMLOSS"
    assert (16 + header_length) % 64 == 0  # the payload is 64-byte aligned
    header = json.loads(data[16 : 16 + header_length])
    assert header["format"] == "memloss-addon memory"
    assert header["file_version"] == 1 and header["state_version"] == 2
    assert header["checksum"] == "crc32" and header["byte_order"] == sys.byteorder
    assert header["config"] == {
        "num_samples": N,
        "sample_shape": list(SHAPE),
        "depth": 2,
        "mode": "example",
        "dtype": "float16",
        "eps": 0.25,
        "view_padding": None,
        "beta_prime": 2.0,
        "weighting": "difficulty",
        "detach_weight": True,
        "bn_mode": "train",
    }
    stats = memory.stats()
    assert header["counters"]["calls"] == stats["calls"] == 6
    assert header["counters"]["rows_written"] == stats["rows_written"] == 2 * N

    payload = data[16 + header_length : -8]
    assert len(payload) == header["payload_nbytes"]
    state = memory.state_dict()
    names = ("slots", "slot_count", "ring_head", "last_weight", "fooled_at_write")
    assert sorted(header["tensors"]) == sorted(names)
    for name in names:
        entry = header["tensors"][name]
        raw = payload[entry["offset"] : entry["offset"] + entry["nbytes"]]
        assert entry["offset"] % 64 == 0
        assert entry["shape"] == list(state[name].shape)
        assert raw == state[name].numpy().tobytes()  # raw little-endian values in C order

    tag, crc = struct.unpack("<4sI", data[-8:])
    assert tag == b"MLCK" and crc == zlib.crc32(data[:-8])


CONFIG_CHANGES = [
    ({"num_samples": N + 1}, "num_samples"),
    ({"sample_shape": (6,)}, "sample_shape"),
    ({"depth": 1}, "depth"),
    ({"dtype": torch.bfloat16}, "dtype"),
    ({"mode": "perturbation"}, "mode"),
    ({"dtype": torch.uint8, "eps": 0.1}, "dtype"),
    ({"beta_prime": 1.0}, "beta_prime"),
    ({"weighting": "none"}, "weighting"),
]


@pytest.mark.parametrize(("change", "key"), CONFIG_CHANGES, ids=[k for _, k in CONFIG_CHANGES])
def test_another_configuration_is_refused_and_changes_nothing(tmp_path, change, key):
    saved = make()
    run_epochs(saved, range(2), **EPOCH_DATA)
    saved.save(tmp_path / "memory.bin")
    target = make(**change)
    before = snapshot(target)
    with pytest.raises(MemoryFileError, match=key) as raised:
        target.load(tmp_path / "memory.bin")
    assert "memory.bin" in str(raised.value)
    assert isinstance(raised.value, ValueError)
    assert_unchanged(before, target)


def test_non_strict_load_accepts_other_loss_settings_only(tmp_path):
    make(beta_prime=3.0).save(tmp_path / "memory.bin")
    target = make(beta_prime=1.0)
    target.load(tmp_path / "memory.bin", strict=False)
    assert target.beta_prime == 1.0
    with pytest.raises(MemoryFileError, match="eps"):
        make(eps=0.5).load(tmp_path / "memory.bin", strict=False)


@pytest.fixture
def saved_file(tmp_path) -> tuple[Path, bytes]:
    memory = make()
    run_epochs(memory, range(2), **EPOCH_DATA)
    path = tmp_path / "memory.bin"
    memory.save(path)
    return path, path.read_bytes()


def refused(path: Path, match: str | None = None) -> None:
    """Loading ``path`` into a filled memory raises MemoryFileError and changes nothing."""
    memory = make()
    run_epochs(memory, range(1), **EPOCH_DATA)
    before = snapshot(memory)
    with pytest.raises(MemoryFileError, match=match):
        memory.load(path)
    assert_unchanged(before, memory)


@pytest.mark.parametrize("keep", [0, 5, 12, 40, -300, -9, -1], ids=lambda k: f"keep{k}")
def test_truncated_files_are_refused(saved_file, keep):
    path, data = saved_file
    path.write_bytes(data[:keep] if keep >= 0 else data[: len(data) + keep])
    refused(path, "truncated|damaged|empty")


def test_trailing_bytes_are_refused(saved_file):
    path, data = saved_file
    path.write_bytes(data + b"\0")
    refused(path, "damaged")


def test_every_single_byte_change_is_refused(saved_file):
    path, data = saved_file
    memory = make()
    run_epochs(memory, range(1), **EPOCH_DATA)
    before = snapshot(memory)
    descriptor = os.open(path, os.O_RDWR)
    try:
        for position in range(len(data)):
            for flip in (0x01, 0xFF):
                # Changed in place: rewriting a whole file 3000 times is slow on some disks.
                os.pwrite(descriptor, bytes([data[position] ^ flip]), position)
                with pytest.raises(MemoryFileError):
                    memory.load(path)
            os.pwrite(descriptor, data[position : position + 1], position)
    finally:
        os.close(descriptor)
    assert path.read_bytes() == data
    assert_unchanged(before, memory)


class RunsCode:
    """Unpickling this creates the marker file: evidence that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def hostile_files(tmp_path: Path) -> dict[str, tuple[bytes, str]]:
    marker = tmp_path / "code-ran"
    pickled = pickle.dumps(RunsCode(marker))
    torch.save({"slots": RunsCode(marker)}, tmp_path / "hostile.pt")
    torch.save(make().state_dict(), tmp_path / "plain.pt")
    np.save(tmp_path / "array.npy", np.zeros(3))
    # Right magic, then a pickle where the JSON header belongs.
    magic_then_pickle = b"\x93MEMLOSS" + struct.pack("<Q", len(pickled)) + pickled
    return {
        "pickle with a __reduce__ payload": (pickled, "pickle"),
        "torch.save of a custom class": ((tmp_path / "hostile.pt").read_bytes(), "torch.save"),
        "torch.save of a state dict": ((tmp_path / "plain.pt").read_bytes(), "weights_only=True"),
        "magic then a pickle": (magic_then_pickle, "JSON"),
        "numpy .npy": ((tmp_path / "array.npy").read_bytes(), "NUMPY"),
        "empty file": (b"", "empty"),
        "JSON text": (b'{"format": "memloss-addon memory"}', "not a memloss-addon"),
        "random bytes": (
            bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
            "not a memloss-addon",
        ),
        "first bytes of the magic": (b"\x93MEML", "truncated"),
    }


def test_other_formats_are_refused_and_no_code_runs(tmp_path):
    files = hostile_files(tmp_path)
    for case, (content, message) in files.items():
        path = tmp_path / "candidate.bin"
        path.write_bytes(content)
        memory = make()
        before = snapshot(memory)
        with pytest.raises(MemoryFileError, match=message):
            memory.load(path)
        assert_unchanged(before, memory)
        with pytest.raises(MemoryFileError):
            read_header(path)
        assert not (tmp_path / "code-ran").exists(), case
    # The payloads do run code when unpickled: the marker test above can fail.
    pickle.loads(files["pickle with a __reduce__ payload"][0])
    assert (tmp_path / "code-ran").exists()


def test_loading_never_calls_an_unpickler(saved_file, monkeypatch):
    path, _ = saved_file

    def forbidden(*args, **kwargs):
        raise AssertionError("loading a memory file must not unpickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    memory = make()
    memory.load(path)
    assert memory.stats()["calls"] == 6


def write_raw(path: Path, header: dict, payload: bytes) -> None:
    """Writes a file in the documented layout from a header and payload of the test's choosing."""
    encoded = json.dumps(header).encode()
    encoded += b" " * (-(16 + len(encoded)) % 64)
    body = b"\x93MEMLOSS" + struct.pack("<Q", len(encoded)) + encoded + payload
    path.write_bytes(body + struct.pack("<4sI", b"MLCK", zlib.crc32(body)))


def split(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[8:16])
    return json.loads(data[16 : 16 + length]), data[16 + length : -8]


def forge(edit):
    def apply(header: dict, payload: bytes) -> tuple[dict, bytes]:
        result = edit(header, bytearray(payload))
        return result if isinstance(result, tuple) else (header, payload)

    return apply


def set_in(*keys_and_value):
    *keys, value = keys_and_value

    def edit(header, payload):
        target = header
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return edit


def nan_slot(header, payload):
    entry = header["tensors"]["slots"]
    payload[entry["offset"] : entry["offset"] + 4] = struct.pack("<f", float("nan"))
    return header, bytes(payload)


def count_above_depth(header, payload):
    entry = header["tensors"]["slot_count"]
    payload[entry["offset"] : entry["offset"] + 4] = struct.pack("<i", 3)
    return header, bytes(payload)


def overlapping(header, payload):
    header["tensors"]["ring_head"]["offset"] = header["tensors"]["slot_count"]["offset"]


FORGED = {
    "other format name": (set_in("format", "something else"), "format"),
    "newer file version": (set_in("file_version", 2), "file format version 2"),
    "other state version": (set_in("state_version", 99), "state version 99"),
    "big-endian": (set_in("byte_order", "big"), "byte order"),
    "unknown checksum": (set_in("checksum", "md5"), "checksum"),
    "header is a list": (lambda h, p: ([1, 2], bytes(p)), "JSON object"),
    "object dtype": (set_in("tensors", "slots", "dtype", "object"), "dtype 'object'"),
    "negative shape": (set_in("tensors", "slots", "shape", [-10, 2, 1, 2, 3]), "shape"),
    "float shape": (set_in("tensors", "slots", "shape", [10.0, 2, 1, 2, 3]), "shape"),
    "size disagrees with shape": (set_in("tensors", "slots", "nbytes", 4), "bytes for shape"),
    "unaligned offset": (set_in("tensors", "slots", "offset", 3), "offset"),
    "tensor past the payload": (set_in("tensors", "ring_head", "offset", 1 << 40), "after"),
    "overlapping tensors": (overlapping, "overlap"),
    "missing tensor": (lambda h, p: h["tensors"].pop("ring_head"), "tensors are"),
    "huge payload claimed": (set_in("payload_nbytes", 1 << 50), "truncated"),
    "config says another size": (set_in("config", "num_samples", N + 1), "num_samples"),
    "sample_shape as a string": (set_in("config", "sample_shape", "1,2,3"), "sample_shape"),
    "counters not numbers": (set_in("counters", "calls", "six"), "calls"),
    "negative counter": (set_in("counters", "rows_read", -1), "rows_read"),
    "config missing": (set_in("config", None), "config"),
    "NaN in the slots": (nan_slot, "NaN"),
    "shard of a sharded memory": (set_in("shard", {"rank": 1, "world_size": 2}), "shard"),
    "malformed shard": (set_in("shard", {"rank": 2, "world_size": 2}), "shard"),
    "slot_count above depth": (count_above_depth, "slot_count"),
}


@pytest.mark.parametrize(("edit", "message"), FORGED.values(), ids=FORGED.keys())
def test_forged_files_with_a_valid_checksum_are_refused(saved_file, edit, message):
    path, data = saved_file
    header, payload = split(data)
    header, payload = forge(edit)(header, payload)
    write_raw(path, header, payload)
    refused(path, message)


def test_unedited_rewrite_by_the_test_writer_loads(saved_file):
    """The forging helper writes valid files: the refusals above come from the edits alone."""
    path, data = saved_file
    write_raw(path, *split(data))
    assert path.read_bytes() == data
    make().load(path)


def test_atomic_write_leaves_the_old_file_when_the_block_raises(tmp_path):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), atomic_write(target) as file:
        file.write(b"new, half written")
        raise KeyboardInterrupt
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_failing_save_keeps_the_previous_file(saved_file, monkeypatch, failing):
    path, data = saved_file
    memory = make()
    run_epochs(memory, range(3), **EPOCH_DATA)

    def disk_error(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, failing, disk_error)
    with pytest.raises(OSError, match="No space"):
        memory.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == data
    assert os.listdir(path.parent) == [path.name]
    make().load(path)


def test_new_files_get_default_permissions_and_replaced_files_keep_theirs(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    memory = make()
    memory.save(tmp_path / "new.bin")
    assert (tmp_path / "new.bin").stat().st_mode & 0o777 == 0o666 & ~umask
    private = tmp_path / "private.bin"
    private.write_bytes(b"")
    private.chmod(0o600)
    memory.save(private)
    assert private.stat().st_mode & 0o777 == 0o600


KILLED_SAVER = textwrap.dedent(
    """
    import os, sys, time
    import torch
    from torch import nn
    from memloss_addon import MemoryWrapper
    from memloss_addon.store import file_format as persistence

    path, point = sys.argv[1], sys.argv[2]
    memory = MemoryWrapper(nn.Identity(), 4096, (64,), beta_prime=0.0)
    def fill(value):
        x = torch.full((4096, 64), value)
        memory(torch.arange(4096), x, x, torch.zeros(4096, 2), torch.zeros(4096, dtype=torch.long))
    fill(0.25)
    memory.save(path)  # version A, complete
    fill(0.75)

    def stop(where):
        print(where, flush=True)
        time.sleep(60)  # the test kills the process here

    if point == "mid-payload":
        persistence._CHUNK_BYTES = 4096
        real_crc32 = persistence.zlib.crc32
        calls = [0]
        class Zlib:
            @staticmethod
            def crc32(data, value=0):
                calls[0] += 1
                if calls[0] == 20:
                    stop("mid-payload")
                return real_crc32(data, value)
        persistence.zlib = Zlib
    elif point == "before-rename":
        real_replace = os.replace
        os.replace = lambda *args: (stop("before-rename"), real_replace(*args))
    elif point == "after-rename":
        real_replace = os.replace
        os.replace = lambda *args: (real_replace(*args), stop("after-rename"))
    memory.save(path)  # version B, killed at `point`
    """
)


@pytest.mark.parametrize(
    ("point", "expected"), [("mid-payload", 0.25), ("before-rename", 0.25), ("after-rename", 0.75)]
)
def test_sigkill_during_save_leaves_a_complete_file(tmp_path, point, expected):
    path = tmp_path / "memory.bin"
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_SAVER, str(path), point],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
    try:
        assert child.stdout.readline().strip() == point
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    leftovers = [name for name in os.listdir(tmp_path) if name != "memory.bin"]
    assert all(name.startswith(".memory.bin.") and name.endswith(".tmp") for name in leftovers)
    assert len(leftovers) == (0 if point == "after-rename" else 1)
    memory = MemoryWrapper(nn.Identity(), 4096, (64,), beta_prime=0.0)
    memory.load(path)
    slots = memory.state_dict()["slots"]
    assert bool((slots == expected).all())


def test_the_next_save_removes_the_temporary_file_of_a_killed_save(tmp_path):
    path = tmp_path / "memory.bin"
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_SAVER, str(path), "mid-payload"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
    try:
        assert child.stdout.readline().strip() == "mid-payload"
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=60)
    [stale] = [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
    assert stale.startswith(".memory.bin.")
    another = tmp_path / ".other.bin.abcd1234.tmp"  # a leftover of saves to another file: kept
    another.write_bytes(b"not ours")
    memory = make()
    run_epochs(memory, range(2), **EPOCH_DATA)
    memory.save(path)
    assert sorted(os.listdir(tmp_path)) == [another.name, "memory.bin"]
    make().load(path)


def test_a_save_in_progress_keeps_its_temporary_file(tmp_path):
    path = tmp_path / "memory.bin"
    with atomic_write(path) as file:  # a writer still at work holds the lock on its file
        file.write(b"the first writer's bytes")
        make().save(path)  # a second writer removes stale files first: not this one
        assert len([name for name in os.listdir(tmp_path) if name.endswith(".tmp")]) == 1
    assert path.read_bytes() == b"the first writer's bytes"
    assert os.listdir(tmp_path) == ["memory.bin"]


def peak_rss_growth_of(action) -> int:
    """Bytes by which the peak resident set grows during ``action`` (Linux only)."""

    def status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    Path("/proc/self/clear_refs").write_text("5")  # resets the peak to the current size
    before = status("VmRSS")
    action()
    return status("VmHWM") - before


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc")
def test_saving_a_large_memory_holds_no_second_copy(tmp_path):
    memory = MemoryWrapper(nn.Identity(), 16_384, (1024,), beta_prime=0.0)  # 64 MiB of slots
    labels = torch.zeros(2048, dtype=torch.long)
    for start in range(0, 16_384, 2048):
        x = torch.rand(2048, 1024)
        memory(torch.arange(start, start + 2048), x, x, torch.zeros(2048, 2), labels)
    del x
    growth = peak_rss_growth_of(lambda: memory.save(tmp_path / "memory.bin"))
    assert growth < 24 * 2**20, f"saving grew the peak RSS by {growth / 2**20:.1f} MiB"
    restored = MemoryWrapper(nn.Identity(), 16_384, (1024,), beta_prime=0.0)
    restored.load(tmp_path / "memory.bin")
    assert torch.equal(restored.state_dict()["slots"], memory.state_dict()["slots"])


def test_read_header_gives_the_configuration_without_loading(saved_file):
    path, _ = saved_file
    header = read_header(path)
    assert header["config"]["depth"] == 2 and header["config"]["sample_shape"] == list(SHAPE)
    assert header["counters"]["calls"] == 6


@requires_cuda
def test_cuda_memory_round_trips_through_a_file_to_cpu_and_back(tmp_path):
    on_gpu = make(device="cuda")
    data = torch.rand(N, *SHAPE, device="cuda")
    labels = torch.arange(N, device="cuda") % CLASSES
    on_gpu.model.to("cuda")
    on_gpu(torch.arange(N), data, data, on_gpu.model(data), labels)
    on_gpu.save(tmp_path / "memory.bin")
    on_cpu = make()
    on_cpu.load(tmp_path / "memory.bin")
    back = make(device="cuda")
    back.load(tmp_path / "memory.bin")
    assert torch.equal(on_cpu.state_dict()["slots"], on_gpu.state_dict()["slots"].cpu())
    assert back.state_dict()["slots"].is_cuda
    assert torch.equal(back.state_dict()["slots"], on_gpu.state_dict()["slots"])


@pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")
def test_a_rank_of_a_sharded_memory_saves_and_loads_its_shard(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/group", rank=0, world_size=1)
    try:
        sharded = make(distributed="sharded")
        run_epochs(sharded, range(2), **EPOCH_DATA)
        sharded.save(tmp_path / "memory.bin")
        assert read_header(tmp_path / "memory.bin")["shard"] == {"rank": 0, "world_size": 1}
        restored = make(distributed="sharded")
        restored.load(tmp_path / "memory.bin")
        assert_unchanged(snapshot(sharded), restored)
        # A shard is not a whole memory: loading it into one is refused with the way out.
        refused(tmp_path / "memory.bin", "merge_shard_states")
    finally:
        dist.destroy_process_group()


def test_a_disk_backed_memory_round_trips_through_a_file(tmp_path):
    on_disk = make(storage_path=tmp_path / "store-a")
    run_epochs(on_disk, range(2), **EPOCH_DATA)
    on_disk.save(tmp_path / "memory.bin")
    for target in (make(storage_path=tmp_path / "store-b"), make()):
        target.load(tmp_path / "memory.bin")
        assert_unchanged(snapshot(on_disk), target)


def test_saving_through_a_symbolic_link_replaces_the_file_it_points_to(tmp_path):
    (tmp_path / "runs").mkdir()
    make().save(tmp_path / "runs" / "memory.bin")
    (tmp_path / "latest.bin").symlink_to(tmp_path / "runs" / "memory.bin")
    memory = make()
    run_epochs(memory, range(2), **EPOCH_DATA)
    memory.save(tmp_path / "latest.bin")
    assert (tmp_path / "latest.bin").is_symlink()
    restored = make()
    restored.load(tmp_path / "runs" / "memory.bin")
    assert_unchanged(snapshot(memory), restored)


def test_a_file_of_state_version_1_loads_with_initial_per_slot_bookkeeping(tmp_path):
    from memloss_addon.store.file_format import write_memory_file

    original = make()
    run_epochs(original, range(2), **EPOCH_DATA)
    state = original.state_dict()
    # A version-1 state: no per-slot bookkeeping.
    old = {k: v for k, v in state.items() if k not in ("last_weight", "fooled_at_write")}
    write_memory_file({**old, "format_version": 1}, tmp_path / "old.bin")
    assert read_header(tmp_path / "old.bin")["state_version"] == 1

    restored = make()
    restored.load(tmp_path / "old.bin")
    loaded = restored.state_dict()
    for name in ("slots", "slot_count", "ring_head"):
        assert torch.equal(loaded[name], state[name])
    slots = N * 2  # depth 2
    assert loaded["last_weight"].tolist() == [float("inf")] * slots  # never read since stored
    assert loaded["fooled_at_write"].tolist() == [255] * slots  # not known


def test_a_newer_state_version_is_refused_by_name(tmp_path):
    from memloss_addon.store.file_format import write_memory_file

    state = make().state_dict()
    write_memory_file({**state, "format_version": 3}, tmp_path / "new.bin")
    with pytest.raises(MemoryFileError, match="state version 3"):
        make().load(tmp_path / "new.bin")
