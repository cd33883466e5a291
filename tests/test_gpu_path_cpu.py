"""The GPU path checked without a GPU: stand-ins for the pinned allocator, streams and events.

- Pinned memory: the rows of a CPU memory are never pinned, and ``nbytes`` counts the
  power-of-two blocks the host allocator locks for the staging and prefetch buffers.
- Ordering: :class:`SlowGpu` replaces ``placement.cuda_ops`` with streams whose copies run only
  when the host waits for them (the slowest GPU there could be), so a staging buffer refilled
  before its copy ran hands the wrong rows to that copy, and the test sees it.
- Every host index copy to the batch's device goes through ``transfer.to_device``.
- Device choice under DDP (with a fake current device) and the backend warning.
- Encoding never asks the host for a value of a device tensor (tried on the ``meta`` device,
  where any such question raises).
"""

from __future__ import annotations

import contextlib
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from memloss_addon import MemoryWrapper
from memloss_addon.store import placement, transfer
from memloss_addon.store.codecs import make_codec
from memloss_addon.store.distributed import _Exchange, backends_by_device, exchange_gpu
from memloss_addon.store.placement import TensorStore
from tests.helpers import mlp

GPU = torch.device("cuda", 0)  # a device name only: the stand-ins never touch CUDA


# ---------------------------------------------------------------------- a slow GPU


class SlowStream:
    """Work queued on a stream runs only when something waits for it."""

    def __init__(self, gpu: SlowGpu, name: str) -> None:
        self.gpu, self.name = gpu, name
        self.queue: list = []
        self.done = 0

    def run_until(self, position: int) -> None:
        while self.done < position:
            work = self.queue[self.done]
            self.done += 1
            work()

    def wait_stream(self, other: SlowStream) -> None:
        position = len(other.queue)
        self.queue.append(lambda: other.run_until(position))

    def wait_event(self, event: SlowEvent) -> None:
        self.gpu.log.append(("wait_event", self.name, event.name))
        self.queue.append(event.run)


class SlowEvent:
    def __init__(self, gpu: SlowGpu) -> None:
        self.gpu = gpu
        self.name = f"event{len(gpu.events)}"
        gpu.events.append(self)
        self.stream: SlowStream | None = None
        self.position = 0

    def record(self, stream: SlowStream) -> None:
        self.stream, self.position = stream, len(stream.queue)

    def run(self) -> None:
        assert self.stream is not None
        self.stream.run_until(self.position)

    def synchronize(self) -> None:  # the host waits
        self.gpu.log.append(("synchronize", self.name))
        self.run()


class SlowGpu:
    """Stands in for ``placement.cuda_ops``; records pinned allocations, copies and waits."""

    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.events: list[SlowEvent] = []
        self.pinned_requests: list[int] = []  # bytes asked of the pinned allocator
        self.default = SlowStream(self, "current")
        self.streams = [self.default]
        self.active = self.default

    def pinned_empty(self, shape, dtype):
        buffer = torch.full(shape, -1, dtype=dtype)
        self.pinned_requests.append(buffer.nbytes)
        return buffer

    def event(self):
        return SlowEvent(self)

    def current_stream(self, device):
        return self.active

    def new_stream(self, device):
        stream = SlowStream(self, f"side{len(self.streams)}")
        self.streams.append(stream)
        return stream

    @contextlib.contextmanager
    def use_stream(self, stream):
        previous, self.active = self.active, stream
        try:
            yield
        finally:
            self.active = previous

    def copy(self, pinned, target):
        out = torch.full_like(pinned, -2)  # what a reader sees before the copy has run
        stream = self.active
        self.log.append(("copy", stream.name))
        stream.queue.append(lambda: out.copy_(pinned))
        return out

    def record_stream(self, tensor, stream):
        self.log.append(("record_stream", stream.name))

    def finish(self) -> None:
        """Everything queued has run (as before a ``.item()``)."""
        for stream in self.streams:
            stream.run_until(len(stream.queue))

    def waits(self) -> list[str]:
        return [entry[1] for entry in self.log if entry[0] == "synchronize"]


@pytest.fixture
def slow_gpu(monkeypatch) -> SlowGpu:
    gpu = SlowGpu()
    monkeypatch.setattr(placement, "cuda_ops", gpu)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return gpu


def numbered_store(num_rows: int = 12, row_shape=(3, 4), **options) -> TensorStore:
    """A CPU store whose row r holds the values 100 * r + k."""
    store = TensorStore(num_rows, row_shape, dtype=torch.float32, device="cpu", **options)
    width = row_shape[0] * row_shape[1]
    values = [[100.0 * r + k for k in range(width)] for r in range(num_rows)]
    store.write(torch.arange(num_rows), torch.tensor(values).view(num_rows, *row_shape))
    return store


def numbered_rows(rows: list[int], row_shape=(3, 4)) -> torch.Tensor:
    width = row_shape[0] * row_shape[1]
    return torch.tensor([[100.0 * r + k for k in range(width)] for r in rows]).view(-1, *row_shape)


# ---------------------------------------------------------------------- pinned memory


def test_pinned_nbytes_is_the_next_power_of_two():
    assert [transfer.pinned_nbytes(n) for n in (0, 1, 2, 3, 240, 256, 257)] == [
        0,
        1,
        2,
        4,
        256,
        256,
        512,
    ]
    assert transfer.pinned_nbytes(614_400_000) == 1 << 30  # float32 CIFAR-10 would lock 1 GiB


def test_the_rows_of_a_cpu_memory_are_never_pinned(slow_gpu):
    store = numbered_store(100)
    assert store.pinned_staging  # CUDA is "available": reads to CUDA are staged
    assert slow_gpu.pinned_requests == []  # ... but nothing is pinned until a read needs it
    assert store.nbytes == 100 * 12 * 4
    memory = MemoryWrapper(mlp(), 50, (3, 32, 32), dtype=torch.uint8)
    assert slow_gpu.pinned_requests == []
    assert memory.store.rows.nbytes == 50 * 3 * 32 * 32


def test_nbytes_counts_the_pinned_blocks_the_buffers_lock(slow_gpu):
    store = numbered_store(100)  # rows of 48 bytes
    data = 100 * 48
    store.read(torch.arange(5), GPU)  # 240 bytes lock 256: a buffer of 5 rows
    assert store.nbytes == data + 256
    store.read(torch.arange(7), GPU)  # 336 bytes lock 512: the second buffer holds 10 rows
    assert store.nbytes == data + 256 + 512
    store.read(torch.arange(7), GPU)  # the first buffer (5 rows) is replaced by one of 10
    assert store.nbytes == data + 512 + 512
    store.read(torch.arange(10), GPU)  # fits the second buffer: nothing new
    store.start_read(torch.arange(6), GPU)  # the prefetch buffer: 288 bytes lock 512
    assert store.nbytes == data + 512 + 512 + 512
    assert slow_gpu.pinned_requests == [240, 480, 480, 480]


def test_a_memory_without_staging_pins_nothing(slow_gpu):
    store = numbered_store(10, pin_memory=False)
    assert not store.pinned_staging
    assert store.nbytes == 10 * 48
    assert slow_gpu.pinned_requests == []


# ---------------------------------------------------------------------- ordering


def test_a_staging_buffer_is_refilled_only_after_its_copy_has_run(slow_gpu):
    store = numbered_store()
    batches = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11], [2, 0, 1]]
    results = [store.read(torch.tensor(rows), GPU) for rows in batches]
    assert (results[-1] == -2).all()  # the slow GPU has not run the last copy by itself
    slow_gpu.finish()
    for rows, got in zip(batches, results, strict=True):
        assert torch.equal(got, numbered_rows(rows))


def test_a_read_waits_only_for_the_copy_two_reads_back(slow_gpu):
    store = numbered_store()
    store.read(torch.tensor([0]), GPU)
    store.read(torch.tensor([1]), GPU)
    assert slow_gpu.waits() == []  # two buffers: the first two reads never wait
    store.read(torch.tensor([2]), GPU)
    assert slow_gpu.waits() == ["event0"]  # the copy of the first read, out of the same buffer
    store.read(torch.tensor([3]), GPU)
    assert slow_gpu.waits() == ["event0", "event1"]
    assert [entry for entry in slow_gpu.log if entry[0] == "copy"] == [("copy", "current")] * 4


def test_a_prefetch_buffer_is_refilled_only_after_its_copy_has_run(slow_gpu):
    store = numbered_store()
    first = store.start_read(torch.tensor([4, 5]), GPU)
    rows_first = first.wait()
    second = store.start_read(torch.tensor([6, 7, 8]), GPU)  # refills the one prefetch buffer
    assert slow_gpu.waits() == ["event0"]
    rows_second = second.wait()
    slow_gpu.finish()
    assert torch.equal(rows_first, numbered_rows([4, 5]))
    assert torch.equal(rows_second, numbered_rows([6, 7, 8]))


def test_prefetched_rows_are_copied_on_a_side_stream_and_awaited_on_the_current_one(slow_gpu):
    store = numbered_store()
    pending = store.start_read(torch.tensor([3, 1]), GPU)
    assert slow_gpu.log == [("copy", "side1")]
    rows = pending.wait()
    # The current stream waits for the side stream's event; the host does not.
    assert slow_gpu.log[1:] == [
        ("wait_event", "current", "event0"),
        ("record_stream", "current"),
    ]
    assert slow_gpu.waits() == []
    slow_gpu.default.run_until(len(slow_gpu.default.queue))  # work queued after the wait
    assert torch.equal(rows, numbered_rows([3, 1]))


def test_a_prefetch_on_the_cpu_is_the_rows_at_once():
    store = numbered_store()
    assert torch.equal(
        store.start_read(torch.tensor([5]), torch.device("cpu")).wait(), store.data[5:6]
    )


# ---------------------------------------------------------------------- host index copies


class CopyRecorder:
    """Wraps ``transfer.to_device`` and keeps the values and target of every copy."""

    def __init__(self, monkeypatch) -> None:
        self.copies: list[tuple[list, str]] = []
        original = transfer.to_device

        def recording(tensor, device):
            self.copies.append((tensor.tolist(), str(torch.device(device))))
            return original(tensor, device)

        monkeypatch.setattr(transfer, "to_device", recording)


def test_to_device_is_a_no_op_for_a_host_tensor_bound_for_the_cpu():
    rows = torch.tensor([4, 2])
    assert transfer.to_device(rows, "cpu") is rows


def test_every_host_index_copy_of_a_call_goes_through_to_device(monkeypatch):
    recorder = CopyRecorder(monkeypatch)
    model = mlp()
    memory = MemoryWrapper(model, 6, (4,), depth=2)
    x = torch.rand(3, 4, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2])

    def call(indices):
        idx = torch.tensor(indices)
        memory(
            idx, x[: len(indices)], x[: len(indices)], model(x[: len(indices)]), labels[: len(idx)]
        )

    call([1, 2])  # nothing stored yet: no read; the rows are written in batch order
    assert recorder.copies == []
    call([2, 1, 2])  # one slot each; sample 2 twice: the last row (position 2) wins
    # One row per sample in batch order: the term needs no index copy, the write one.
    assert recorder.copies == [([1, 2], "cpu")]  # the winning rows (sample 1 at 1, 2 at 2)
    recorder.copies.clear()
    call([2, 1])  # two slots each: the term gathers its rows; the write is in batch order
    assert recorder.copies == [
        ([0, 0, 1, 1], "cpu"),  # the read: the clean rows its decoding replays on
        ([0, 0, 1, 1], "cpu"),  # the term: each row's batch position
        ([2, 2], "cpu"),  # the term: each sample's filled slots
    ]
    recorder.copies.clear()
    call([1, 4])  # sample 1 has two slots, sample 4 none
    assert recorder.copies == [
        ([0, 0], "cpu"),  # the read: the clean rows its perturbation or projection may need
        ([0, 0], "cpu"),  # the term
        ([2, 0], "cpu"),
    ]


# ---------------------------------------------------------------------- device choice


@pytest.fixture
def fake_gpu_1(monkeypatch):
    """CUDA "available", with cuda:1 current (as after torch.cuda.set_device(1))."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def cuda(index: int | None = None) -> torch.device:
    return torch.device("cuda") if index is None else torch.device("cuda", index)


def test_the_exchange_uses_the_memorys_gpu_then_the_batchs_then_the_current_one(fake_gpu_1):
    cpu = torch.device("cpu")
    assert exchange_gpu(cuda(0), cuda(0), store_was_bare=False) == cuda(0)
    assert exchange_gpu(cpu, cuda(0), store_was_bare=False) == cuda(0)
    assert exchange_gpu(cpu, cpu, store_was_bare=False) == cuda(1)
    assert exchange_gpu(cpu, None, store_was_bare=False) == cuda(1)
    # An explicit device need not be the current one (device=f"cuda:{local_rank}" is a fix).
    assert exchange_gpu(cuda(0), None, store_was_bare=False) == cuda(0)


def test_a_memory_on_another_gpu_than_its_batch_raises_naming_both(fake_gpu_1):
    with pytest.raises(ValueError) as error:
        exchange_gpu(cuda(0), cuda(1), store_was_bare=False)
    message = str(error.value)
    assert "cuda:0" in message and "cuda:1" in message
    assert (
        "torch.cuda.set_device(local_rank)" in message and "device=f'cuda:{local_rank}'" in message
    )


def test_a_bare_cuda_memory_built_before_set_device_raises(fake_gpu_1):
    # Built while cuda:0 was current, so "cuda" became cuda:0; cuda:1 is current now.
    with pytest.raises(ValueError, match=r"cuda:0.*current CUDA device is now cuda:1"):
        exchange_gpu(cuda(0), None, store_was_bare=True)
    assert exchange_gpu(cuda(1), cuda(1), store_was_bare=True) == cuda(1)


def test_backends_by_device():
    assert backends_by_device("cpu:gloo,cuda:nccl") == {"cpu": "gloo", "cuda": "nccl"}
    assert backends_by_device("cuda:nccl") == {"cuda": "nccl"}
    assert backends_by_device("nccl") == {"cuda": "nccl"}
    assert backends_by_device("gloo") == {"cpu": "gloo", "cuda": "gloo"}


@pytest.fixture
def one_rank(tmp_path):
    """A one-process gloo group, destroyed afterwards (other tests expect none)."""
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp_path / 'rendezvous'}",
        rank=0,
        world_size=1,
        timeout=timedelta(seconds=30),
    )
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize(
    ("config", "store", "rows_on_cuda", "meta_on_cuda", "warns"),
    [
        ("cpu:gloo,cuda:gloo", "cpu", False, False, False),
        ("cpu:gloo,cuda:gloo", "cuda", False, False, True),
        ("cpu:gloo,cuda:nccl", "cpu", False, False, False),
        ("cpu:gloo,cuda:nccl", "cuda", True, False, False),
        ("cuda:nccl", "cpu", True, True, False),
        ("cuda:nccl", "cuda", True, True, False),
    ],
)
def test_what_travels_on_the_gpu_for_each_backend(
    one_rank, monkeypatch, config, store, rows_on_cuda, meta_on_cuda, warns
):
    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exchange = _Exchange(None, torch.device(store))
    assert (exchange.rows_on_cuda, exchange.meta_on_cuda) == (rows_on_cuda, meta_on_cuda)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == (1 if warns else 0)
    if warns:
        assert "through the CPU" in messages[0] and "nccl" in messages[0]


def test_a_gpu_mismatch_raises_before_the_first_collective_and_tells_the_others(
    one_rank, fake_gpu_1, monkeypatch
):
    memory = MemoryWrapper(mlp(), 4, (4,), distributed="sharded")
    store = memory.store
    # As if built with device="cuda" while cuda:0 was current, before set_device(1).
    store.exchange.requested, store.exchange.store_device = cuda(), cuda(0)
    headers = []
    original = store.exchange.gather_padded

    def gather(values, length):
        headers.append(values.tolist())
        return original(values, length)

    monkeypatch.setattr(store.exchange, "gather_padded", gather)
    x = torch.rand(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="set_device"):
        store.read(torch.tensor([0, 1]), x)
    assert headers == [[1, 0]]  # only the failed-call header, which makes the others raise
    store.exchange.meta_on_cuda = True  # a pure nccl group: the gathers could be on a wrong GPU
    headers.clear()
    with pytest.raises(ValueError, match="set_device"):
        store.write(torch.tensor([0, 1]), x, x)
    assert headers == []
    assert memory.stats()["filled_fraction"] == 0.0


def test_an_exchange_on_the_cpu_never_asks_for_a_gpu(one_rank, monkeypatch):
    def no_cuda():  # asking would create a CUDA context on the current GPU of every rank
        raise AssertionError("torch.cuda.current_device() called")

    monkeypatch.setattr(torch.cuda, "current_device", no_cuda)
    memory = MemoryWrapper(mlp(), 4, (4,), distributed="sharded")
    x = torch.rand(2, 4, dtype=torch.float64)
    for _ in range(2):
        memory(torch.tensor([0, 3]), x, x, memory.model(x), torch.tensor([0, 1]))
    assert memory.stats()["filled_fraction"] == 0.5


# ---------------------------------------------------------------------- codecs


@pytest.mark.parametrize(
    ("mode", "dtype", "eps"),
    [
        ("example", torch.float32, None),
        ("example", torch.float16, None),
        ("example", torch.uint8, 0.1),
        ("perturbation", torch.float32, None),
        ("perturbation", torch.bfloat16, 0.1),
        ("perturbation", torch.int8, 0.1),
    ],
)
def test_encoding_on_a_device_never_reads_a_value_on_the_host(mode, dtype, eps):
    # On the meta device every tensor is shape only: bool(), .item() or .cpu() would raise.
    codec = make_codec(mode=mode, dtype=dtype, eps=eps)
    clean = torch.empty(5, 3, 4, device="meta")
    stored, accepted = codec.encode(clean, clean)
    assert stored.dtype == dtype and stored.shape == (5, 3, 4)
    assert accepted.dtype == torch.bool and accepted.shape == (5,)
