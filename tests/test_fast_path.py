"""The GPU fast path of a training run, checked on the CPU: device-resident data, batch
augmentation, bf16 autocast, channels_last, torch.compile, no host reads per step, and resume with
all of it.

The CUDA runs themselves happen in benchmarks/gpu_selfcheck.sh; here every code path runs on the
CPU, where the device-resident data must give the DataLoader's batches bit for bit.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch.utils.data import TensorDataset

from memloss_addon import IndexedDataset, MemoryWrapper
from memloss_addon.experiments import training
from memloss_addon.experiments.checkpoints import load_checkpoint, model_from_checkpoint
from memloss_addon.experiments.datasets import DatasetSplits, load_digits
from memloss_addon.experiments.gpu_data import synthetic_cifar
from memloss_addon.experiments.train_config import TrainConfig
from memloss_addon.experiments.training import TrainingRun
from tests.conftest import requires_cuda
from tests.test_training import _assert_same_state


def _cifar_splits(num_train: int = 40, num_test: int = 12, *, name: str = "fake-cifar"):
    """Synthetic CIFAR-shaped images on the 1/255 grid (as CIFAR's ToTensor gives them)."""
    images, labels = synthetic_cifar(num_train + num_test, seed=5)
    x = images.float() / 255
    return DatasetSplits(
        name=name,
        train=IndexedDataset(TensorDataset(x[:num_train], labels[:num_train])),
        test=TensorDataset(x[num_train:], labels[num_train:]),
        num_classes=10,
        sample_shape=(3, 32, 32),
        synthetic=True,
    )


def _config(**overrides) -> TrainConfig:
    values = dict(
        method="trades",
        epochs=2,
        batch_size=16,
        steps=1,
        memory=True,
        seed=1,
        model="resnet18",
        base_width=2,
        normalization="identity",
        augment=True,
        holdout=8,
    )
    values.update(overrides)
    return TrainConfig(**values)


def _trained(config: TrainConfig, splits: DatasetSplits) -> dict:
    run = TrainingRun(config, splits)
    run.fit()
    return run.state_dict()


def _same_training(a: dict, b: dict) -> None:
    for key in ("model", "optimizer", "memory", "history", "best"):
        _assert_same_state(a[key], b[key], key)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


@pytest.mark.parametrize("pad_mode", ["zeros", "reflect"])
def test_device_data_gives_the_dataloader_batches_bit_for_bit(pad_mode):
    splits = _cifar_splits()
    loader = _trained(_config(pad_mode=pad_mode, device_data=False), splits)
    device = _trained(_config(pad_mode=pad_mode, device_data=True), splits)
    _same_training(loader, device)
    assert loader["history"][1]["memory_term"] > 0


def test_the_batches_are_cropped_and_flipped_views_covering_the_training_set():
    splits = _cifar_splits(num_train=33)  # a last batch of one is dropped, as the loader does
    run = TrainingRun(_config(holdout=0, device_data=True, batch_size=16), splits)
    images = splits.train.dataset.tensors[0]
    seen = []
    for x, y, idx, (offsets, flips) in run.epoch_batches(0):
        seen.extend(idx.tolist())
        assert x.shape[1:] == (3, 32, 32) and torch.equal(y, splits.train.dataset.tensors[1][idx])
        # Each view is the 32x32 crop of the zero-padded image at its offsets, mirrored if
        # flipped: what the batch reports is what it did.
        padded = torch.nn.functional.pad(images[idx], (4,) * 4)
        for view, frame, (r, c), flip in zip(x, padded, offsets.tolist(), flips, strict=True):
            crop = frame[:, r : r + 32, c : c + 32]
            assert torch.equal(view, crop.flip(-1) if flip else crop)
    assert len(seen) == 32 and len(set(seen)) == 32
    assert len(run.epoch_batches(0)) == run.steps_per_epoch == 2
    assert run.epoch_batches(0).samples == 33


@pytest.mark.parametrize("attack_init", ["random", "memory"])
def test_a_memory_aligned_with_the_augmentation_trains_the_same_on_both_data_paths(attack_init):
    splits = _cifar_splits()
    aligned = dict(memory_aligned=True, memory_mode="perturbation", attack_init=attack_init)
    loader = _trained(_config(**aligned, device_data=False, epochs=3), splits)
    device = _trained(_config(**aligned, device_data=True, epochs=3), splits)
    _same_training(loader, device)
    assert all(h["memory_term"] > 0 for h in loader["history"][1:])
    plain = _trained(_config(memory_mode="perturbation", attack_init=attack_init), splits)
    assert plain["history"][1]["memory_term"] != loader["history"][1]["memory_term"]


def test_an_aligned_memory_needs_augmentation_and_perturbations():
    with pytest.raises(ValueError, match="memory_aligned"):
        _config(memory_aligned=True)  # memory_mode "example"
    with pytest.raises(ValueError, match="memory_aligned"):
        _config(memory_aligned=True, memory_mode="perturbation", augment=False)
    run = TrainingRun(_config(memory_aligned=True, memory_mode="perturbation"), _cifar_splits())
    assert run.memory is not None and run.memory.view_padding == 4


def test_svhn_is_cropped_but_never_flipped():
    splits = _cifar_splits(name="svhn")
    run = TrainingRun(_config(holdout=0, device_data=True), splits)
    assert run.device_data is not None and run.device_data.flip is False


def test_a_dataset_that_augments_already_or_too_small_images_are_refused():
    splits = _cifar_splits()
    augmenting = DatasetSplits(**{**splits.__dict__, "augment": True})
    with pytest.raises(ValueError, match="augments its items"):
        TrainingRun(_config(), augmenting)
    with pytest.raises(ValueError, match="at least 16"):
        TrainingRun(TrainConfig(method="trades", augment=True), load_digits())


@pytest.mark.parametrize("device_data", [False, True])
def test_resume_with_augmentation_and_device_data_is_bit_identical(tmp_path, device_data):
    splits = _cifar_splits()
    config = _config(device_data=device_data, method="hat", helper_epochs=1, batch_size=8)
    straight = _trained(config, splits)
    first = TrainingRun(config, splits)
    first.fit(until_epoch=1, checkpoint_path=tmp_path / "ckpt.pt")
    torch.manual_seed(123)
    resumed = TrainingRun.resume(tmp_path / "ckpt.pt", splits)
    resumed.fit()
    _same_training(straight, resumed.state_dict())
    _assert_same_state(straight["helper"], resumed.state_dict()["helper"], "helper")


def test_resume_may_change_how_a_run_executes_but_not_what_it_trains(tmp_path):
    splits = _cifar_splits()
    config = _config(epochs=1)
    TrainingRun(config, splits).save(tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="epochs"):
        TrainingRun.resume(tmp_path / "ckpt.pt", splits, epochs=3)
    run = TrainingRun.resume(tmp_path / "ckpt.pt", splits, device_data=True, channels_last=True)
    assert run.config.device_data is True and run.config.channels_last is True


def test_checkpoints_rebuild_the_architecture_with_its_width_and_normalization(tmp_path):
    splits = _cifar_splits()
    run = TrainingRun(_config(epochs=1, model="wrn-28-10", base_width=None, widen_factor=1), splits)
    run.save(tmp_path / "ckpt.pt")
    model = model_from_checkpoint(load_checkpoint(tmp_path / "ckpt.pt"))
    assert model.normalize.pair is None  # "identity"
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(model.eval()(x), run.model.eval()(x))


def test_bf16_autocast_trains_and_its_term_stays_float32(monkeypatch):
    splits = _cifar_splits()
    run = TrainingRun(_config(amp="bf16", holdout=0), splits)
    seen = []
    call = MemoryWrapper.__call__

    def spy(self, *args, **kwargs):
        term = call(self, *args, **kwargs)
        seen.append((torch.is_autocast_enabled("cpu"), term.dtype))
        return term

    monkeypatch.setattr(MemoryWrapper, "__call__", spy)
    stats = run.fit()
    assert all(torch.isfinite(torch.tensor(s.loss)) for s in stats)
    assert stats[1].memory_term > 0
    assert seen and set(seen) == {(True, torch.float32)}
    assert {p.dtype for p in run.model.parameters()} == {torch.float32}


def test_bf16_autocast_runs_the_objective_under_autocast(monkeypatch):
    splits = _cifar_splits()
    run = TrainingRun(_config(amp="bf16", holdout=0, memory=False, epochs=1), splits)
    states = []
    objective = training.base_objective("trades")

    def spy(*args, **kwargs):
        states.append(torch.is_autocast_enabled("cpu"))
        return objective(*args, **kwargs)

    monkeypatch.setattr(training, "base_objective", lambda method: spy)
    run.fit()
    assert states and all(states)


def test_channels_last_keeps_the_weights_and_batches_in_that_format():
    splits = _cifar_splits()
    for device_data in (False, True):
        run = TrainingRun(_config(channels_last=True, device_data=device_data), splits)
        x, *_ = next(iter(run.epoch_batches(0)))
        assert x.is_contiguous(memory_format=torch.channels_last)
        conv = run.model.stem_conv.weight  # type: ignore[union-attr]
        assert conv.is_contiguous(memory_format=torch.channels_last)
    # The same weights compute the same function (a few steps of adversarial training would
    # amplify the kernels' rounding differences through the attacks' gradient signs).
    plain, fast = (TrainingRun(_config(channels_last=c), splits).model for c in (False, True))
    x = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-5)


def test_compiled_training_with_the_eager_backend_equals_the_uncompiled_one():
    torch._dynamo.reset()
    try:
        splits = _cifar_splits()
        plain = _trained(_config(holdout=0), splits)
        run = TrainingRun(_config(holdout=0, compile="eager"), splits)
        assert run.train_model is not run.model and run.memory.model is run.train_model
        run.fit()
        compiled = run.state_dict()
        assert not any(k.startswith("_orig_mod") for k in compiled["model"])  # the plain module's
        _same_training(plain, compiled)
    finally:
        torch._dynamo.reset()


_HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


def test_a_training_step_reads_nothing_back_from_the_device_between_syncs(monkeypatch):
    """With sync_every > 1 (an accelerator's setting), neither the step nor the batches ask the
    host for a value; the sums are read every sync_every steps and at the end of the epoch."""
    splits = _cifar_splits(num_train=48)
    run = TrainingRun(_config(holdout=0, device_data=True, batch_size=8, epochs=2), splits)
    run.sync_every = 4
    reads: list[tuple[str, str]] = []
    for name in _HOST_READS:
        original = getattr(torch.Tensor, name)

        def patched(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename == training.__file__:
                reads.append((_name, caller.f_code.co_name))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, patched)
    run.fit()
    monkeypatch.undo()
    assert [r for r in reads if r[1] in ("_train_batch", "__iter__", "train_epoch")] == []
    assert reads.count(("__float__", "_check_finite")) == 2  # step 4 of each epoch
    assert reads.count(("tolist", "read")) == 2  # the end of each epoch


def test_a_non_finite_loss_stops_the_run_on_the_next_read():
    splits = _cifar_splits(num_train=48)
    run = TrainingRun(_config(holdout=0, batch_size=8, lr=1e30, memory=False), splits)
    run.sync_every = 3
    with pytest.raises(FloatingPointError, match="non-finite loss in epoch"):
        run.fit()


# -- on a CUDA device (run by benchmarks/gpu_selfcheck.sh) ----------------------------------------


@requires_cuda
@pytest.mark.parametrize("memory_device", ["cpu", "cuda"])
def test_the_fast_path_trains_on_cuda(tmp_path, memory_device):
    """Device-resident uint8 data, bf16 autocast, channels_last, a pinned-CPU or GPU memory: the
    batches never leave the device, the term is float32 and positive in epoch 2, and a resumed
    run continues (cuDNN kernels need not be bit-identical between runs)."""
    images, labels = synthetic_cifar(48, seed=5)
    splits = DatasetSplits(
        name="fake-cifar",
        train=IndexedDataset(TensorDataset(images[:40], labels[:40])),  # uint8, as CIFAR's bytes
        test=TensorDataset(images[40:].float() / 255, labels[40:]),
        num_classes=10,
        sample_shape=(3, 32, 32),
        synthetic=True,
    )
    config = _config(
        device="cuda",
        memory_device=memory_device,
        amp="bf16",
        channels_last=True,
        holdout=0,
        batch_size=8,
    )
    run = TrainingRun(config, splits)
    assert run.device_data is not None and run.device_data.padded.dtype == torch.uint8
    assert run.device_data.padded.device.type == "cuda" and run.sync_every == training.SYNC_EVERY
    x, y, idx, _ = next(iter(run.epoch_batches(0)))
    assert x.device.type == y.device.type == idx.device.type == "cuda"
    assert x.is_contiguous(memory_format=torch.channels_last)
    stats = run.fit(until_epoch=1, checkpoint_path=tmp_path / "ckpt.pt")
    resumed = TrainingRun.resume(tmp_path / "ckpt.pt", splits)
    stats += resumed.fit()
    assert stats[0].memory_term == 0.0 and stats[1].memory_term > 0.0
    assert all(torch.isfinite(torch.tensor([s.loss, s.memory_term])).all() for s in stats)
    assert resumed.memory is not None and resumed.memory.device.type == memory_device


@requires_cuda
def test_device_data_on_cuda_covers_the_training_set_each_epoch():
    splits = _cifar_splits(num_train=40)
    run = TrainingRun(_config(device="cuda", holdout=0, batch_size=16), splits)
    assert run.config.resolved_device_data  # the default on CUDA
    seen = torch.cat([idx for _, _, idx, _ in run.epoch_batches(1)]).cpu()
    assert sorted(seen.tolist()) == list(range(40))
