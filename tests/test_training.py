"""Training runs: schedules, the helper, checkpoints, and resume giving an identical run."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch.utils.data import TensorDataset

from memloss_addon import IndexedDataset
from memloss_addon.experiments.checkpoints import load_checkpoint, save_checkpoint
from memloss_addon.experiments.datasets import DatasetSplits
from memloss_addon.experiments.train_config import TrainConfig
from memloss_addon.experiments.training import TrainingRun


def _tiny_splits(num_train: int = 96, num_test: int = 40) -> DatasetSplits:
    """Random 1x8x8 images whose label is which quadrant is brightest: learnable and tiny."""
    generator = torch.Generator().manual_seed(123)
    x = torch.rand(num_train + num_test, 1, 8, 8, generator=generator)
    quadrants = torch.stack(
        [
            x[:, 0, :4, :4].mean((1, 2)),
            x[:, 0, :4, 4:].mean((1, 2)),
            x[:, 0, 4:, :4].mean((1, 2)),
            x[:, 0, 4:, 4:].mean((1, 2)),
        ],
        dim=1,
    )
    y = quadrants.argmax(dim=1)
    return DatasetSplits(
        name="digits",
        train=IndexedDataset(TensorDataset(x[:num_train], y[:num_train])),
        test=TensorDataset(x[num_train:], y[num_train:]),
        num_classes=4,
        sample_shape=(1, 8, 8),
        synthetic=True,
    )


def _config(**overrides) -> TrainConfig:
    values = dict(
        method="trades",
        epochs=2,
        batch_size=32,
        steps=2,
        memory=True,
        seed=3,
        model="digits-mlp",
        helper_epochs=1,
    )
    values.update(overrides)
    return TrainConfig(**values)


def _assert_same_state(a: dict, b: dict, path: str = "") -> None:
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _assert_same_state(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            _assert_same_state(u, v, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif path.endswith("seconds"):
        pass  # wall-clock and CPU times differ between runs
    else:
        assert a == b, path


@pytest.mark.parametrize("method", ["trades", "hat"])
def test_resume_continues_bit_identically(tmp_path, method):
    splits = _tiny_splits()
    straight = TrainingRun(_config(method=method), splits)
    straight.fit()

    first = TrainingRun(_config(method=method), splits)
    first.fit(until_epoch=1, checkpoint_path=tmp_path / "ckpt.pt")
    torch.manual_seed(999)  # disturb the global RNG: the checkpoint must restore it
    resumed = TrainingRun.resume(tmp_path / "ckpt.pt", splits)
    assert resumed.epoch == 1
    resumed.fit()

    a, b = straight.state_dict(), resumed.state_dict()
    _assert_same_state(a["model"], b["model"], "model")
    _assert_same_state(a["optimizer"], b["optimizer"], "optimizer")
    _assert_same_state(a["memory"], b["memory"], "memory")
    _assert_same_state(a["helper"], b["helper"], "helper")
    _assert_same_state(a["history"], b["history"], "history")
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    # The memory term is 0 in epoch 1 (nothing stored) and positive in epoch 2.
    assert a["history"][0]["memory_term"] == 0.0 and a["history"][1]["memory_term"] > 0.0


def test_learning_rate_drops_tenfold_at_half_and_three_quarters():
    splits = _tiny_splits()  # 96 samples, batch 32: 3 steps per epoch, 12 in 4 epochs
    run = TrainingRun(_config(epochs=4, memory=False, lr=0.1, method="pgd_at"), splits)
    run.fit()
    # Milestones at steps 6 and 9: after epochs 1..4 (steps 3, 6, 9, 12).
    expected = [0.1, 0.01, 0.001, 0.001]
    assert [h["lr"] for h in run.history] == pytest.approx(expected)


def test_hat_helper_is_trained_then_frozen_in_eval_mode():
    splits = _tiny_splits()
    run = TrainingRun(_config(method="hat", epochs=1, memory=False), splits)
    before = [p.detach().clone() for p in run.helper.parameters()]
    run.fit()
    assert run.helper_trained
    assert not run.helper.training
    assert all(not p.requires_grad for p in run.helper.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(before, run.helper.parameters(), strict=True))


def test_memory_options_reach_the_wrapper():
    splits = _tiny_splits()
    config = _config(
        depth=2, beta_prime=0.5, weighting="none", memory_dtype="float16", bn_mode="eval"
    )
    memory = TrainingRun(config, splits).memory
    assert memory.depth == 2 and memory.beta_prime == 0.5 and memory.weighting == "none"
    assert memory.dtype == torch.float16 and memory.bn_mode == "eval"
    assert memory.num_samples == 96


def test_without_memory_there_is_no_wrapper_and_no_term():
    run = TrainingRun(_config(memory=False, epochs=1), _tiny_splits())
    run.fit()
    assert run.memory is None and run.history[0]["memory_term"] == 0.0


def test_resume_refuses_another_dataset(tmp_path):
    run = TrainingRun(_config(epochs=1), _tiny_splits())
    run.save(tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="training samples"):
        TrainingRun.resume(tmp_path / "ckpt.pt", _tiny_splits(num_train=64))


def test_load_checkpoint_rejects_other_files(tmp_path):
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a memloss training checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "absent.pt")


class _Unpicklable:
    def __reduce__(self):
        raise pickle.PicklingError("refused on purpose")


def test_failed_save_keeps_the_old_checkpoint_and_no_temp_file(tmp_path):
    target = tmp_path / "ckpt.pt"
    save_checkpoint({"epoch": 1}, target)
    with pytest.raises(pickle.PicklingError):
        save_checkpoint({"epoch": 2, "bad": _Unpicklable()}, target)
    assert torch.load(target, weights_only=True) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("method", "fgsm", "method must be"),
        ("epochs", 0, "epochs"),
        ("eps", -0.1, "eps"),
        ("memory_dtype", "int4", "memory_dtype"),
    ],
)
def test_config_rejects_bad_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        _config(**{field: value})


def test_config_round_trips_through_a_dict():
    config = _config(beta=3.0)
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown training config keys"):
        TrainConfig.from_dict({**config.to_dict(), "colour": "red"})


def test_method_defaults():
    assert _config(method="single_step").resolved_steps == 1
    assert _config(method="single_step", eps=0.2).resolved_step_size == pytest.approx(0.25)
    assert _config(method="trades", eps=0.2).resolved_step_size == pytest.approx(0.05)
    assert _config(method="trades").resolved_beta == 6.0
    assert _config(method="pgd_at").resolved_beta is None
    assert _config(method="mart").resolved_weight_decay == 3.5e-3
