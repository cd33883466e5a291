"""Training runs with the memory's new uses: memory-started attacks, diagnostics, held-out best
epoch, per-epoch curves and learning-rate milestones. Expected values come from plain loops."""

from __future__ import annotations

import random

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from memloss_addon import IndexedDataset
from memloss_addon import objectives as objective_functions
from memloss_addon.experiments import training as training_module
from memloss_addon.experiments.checkpoints import load_checkpoint, model_from_checkpoint
from memloss_addon.experiments.datasets import DatasetSplits
from memloss_addon.experiments.epoch_records import EPOCH_COLUMNS
from memloss_addon.experiments.models import build_model
from memloss_addon.experiments.train_config import TrainConfig, describe_lr_schedule
from memloss_addon.experiments.training import TrainingRun
from memloss_addon.experiments.training_setup import memory_attack_start
from memloss_addon.memory import MemoryWrapper
from tests.test_training import _assert_same_state, _config, _tiny_splits

EPS = 0.1


class ObjectiveSpy:
    """Wraps the run's objective and records, per call, the epoch, indices, init and outputs."""

    def __init__(self, run: TrainingRun, method: str) -> None:
        self.run = run
        self.real = getattr(objective_functions, method)
        self.calls: list[dict] = []
        self.index_of_x: dict[bytes, int] = {}

    def __call__(self, model, x, y, *, init=None, **kwargs):
        out = self.real(model, x, y, init=init, **kwargs)
        self.calls.append(
            {
                "epoch": self.run.epoch + 1,
                "x": x.clone(),
                "y": y.clone(),
                "init": None if init is None else init.clone(),
                "adv": out.adv.clone(),
                "adv_logits": out.adv_logits.detach().clone(),
            }
        )
        return out


def _spy(monkeypatch, run: TrainingRun) -> ObjectiveSpy:
    spy = ObjectiveSpy(run, run.config.method)
    monkeypatch.setattr(training_module, "base_objective", lambda method: spy)
    return spy


def _row_key(row: torch.Tensor) -> bytes:
    return row.contiguous().numpy().tobytes()


# -- bit-identity with the plain base method ------------------------------------------------------


def _plain_trades_run(splits: DatasetSplits, *, epochs: int, seed: int) -> torch.nn.Module:
    """TRADES written out by hand: what TrainingRun must do without MemLoss."""
    torch.manual_seed(seed)
    random.seed(seed)
    model = build_model("digits-mlp", sample_shape=(1, 8, 8), num_classes=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=2e-4)
    steps_per_epoch = 3  # 96 samples in batches of 32
    total = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=[round(total * 0.5), round(total * 0.75)], gamma=0.1
    )
    for epoch in range(epochs):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        model.train()
        for x, y, _ in DataLoader(splits.train, batch_size=32, shuffle=True, generator=generator):
            out = objective_functions.trades(
                model, x, y, eps=EPS, step_size=EPS / 4, steps=2, beta=6.0
            )
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            scheduler.step()
        # The run measures test accuracy after each epoch; iterating a DataLoader draws its base
        # seed from the global generator, so the plain loop iterates one too.
        for _ in DataLoader(splits.test, batch_size=512):
            pass
    return model


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"diagnostics": True},
        {"diagnostics": True, "curve_samples": 20, "replay_fraction": 0.5},
    ],
    ids=["no-memory", "diagnostics", "diagnostics+curve"],
)
def test_memloss_off_with_random_starts_equals_the_plain_base_run(extra):
    splits = _tiny_splits()
    run = TrainingRun(_config(memory=False, eps=EPS, epochs=3, **extra), splits)
    assert (run.memory is not None) == bool(extra)
    run.fit()
    plain = _plain_trades_run(splits, epochs=3, seed=3)
    for key, value in plain.state_dict().items():
        assert torch.equal(value, run.model.state_dict()[key]), key
    assert all(h["memory_term"] == 0.0 for h in run.history)
    if extra:
        assert run.memory.beta_prime == 0.0
        assert run.memory.stats()["terms_computed"] == 0  # the term is never computed


# -- memory-started attacks -----------------------------------------------------------------------


@pytest.mark.parametrize("reset_every", [None, 2])
def test_memory_started_attacks_start_from_last_epochs_examples(monkeypatch, reset_every):
    splits = _tiny_splits()  # 96 samples, batch 32: every sample in every epoch
    config = _config(
        method="pgd_at",
        memory=False,
        eps=EPS,
        epochs=4,
        steps=1,
        attack_init="memory",
        attack_reset_every=reset_every,
    )
    run = TrainingRun(config, splits)
    spy = _spy(monkeypatch, run)
    run.fit()
    reset_epochs = {1} if reset_every is None else {1, 3}
    last_adv: dict[bytes, torch.Tensor] = {}  # the newest example made for each sample
    for call in spy.calls:
        if call["epoch"] in reset_epochs:
            assert call["init"] is None, call["epoch"]
        else:
            expected = torch.stack([last_adv[_row_key(row)] for row in call["x"]])
            assert torch.equal(call["init"], expected), call["epoch"]
        for row, adv in zip(call["x"], call["adv"], strict=True):
            last_adv[_row_key(row)] = adv
    assert len(spy.calls) == 4 * 3
    assert [h["attack_from_memory"] for h in run.history] == [
        epoch not in reset_epochs for epoch in range(1, 5)
    ]


def test_random_attack_init_never_passes_an_init(monkeypatch):
    run = TrainingRun(_config(method="pgd_at", memory=True, epochs=2, steps=1), _tiny_splits())
    spy = _spy(monkeypatch, run)
    run.fit()
    assert spy.calls and all(call["init"] is None for call in spy.calls)


def test_memory_attack_start_fills_rows_without_memory_from_a_uniform_start():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    memory = MemoryWrapper(model, num_samples=6, sample_shape=(1, 2, 2), eps=EPS)
    x = torch.full((3, 1, 2, 2), 0.5)
    y = torch.tensor([0, 1, 0])
    before = torch.get_rng_state()
    assert memory_attack_start(memory, torch.tensor([0, 1, 2]), x, eps=EPS) is None
    assert torch.equal(torch.get_rng_state(), before)  # nothing drawn when nothing is stored

    stored = x + 0.05
    memory(torch.tensor([0, 2, 4]), x, stored, model(x), y)
    all_found = memory_attack_start(memory, torch.tensor([4, 0]), x[:2], eps=EPS)
    assert torch.equal(all_found, stored[:2]) and torch.equal(torch.get_rng_state(), before)

    torch.manual_seed(7)
    start = memory_attack_start(memory, torch.tensor([1, 2, 5]), x, eps=EPS)  # only 2 stored
    torch.manual_seed(7)
    u = torch.rand(2, 1, 2, 2)  # drawn for the two rows without memory, in batch order
    by_hand = (0.5 + EPS * (2 * u - 1)).clamp(0.5 - EPS, 0.5 + EPS).clamp(0, 1)
    assert torch.equal(start[1], stored[1])
    assert torch.equal(start[0], by_hand[0]) and torch.equal(start[2], by_hand[1])


# -- diagnostics in the epoch records -------------------------------------------------------------


def test_epoch_diagnostics_match_a_hand_count(monkeypatch):
    splits = _tiny_splits()
    config = _config(method="pgd_at", memory=True, eps=EPS, epochs=3, steps=1, diagnostics=True)
    run = TrainingRun(config, splits)
    spy = _spy(monkeypatch, run)
    stored: dict[bytes, tuple[torch.Tensor, bool]] = {}  # sample -> (example, fooled when made)
    expected: dict[int, list[int]] = {}  # epoch -> [classified, correct, forgotten, recovered]

    def objective(model, x, y, **kwargs):
        out = ObjectiveSpy.__call__(spy, model, x, y, **kwargs)
        counts = expected.setdefault(run.epoch + 1, [0, 0, 0, 0])
        keys = [_row_key(row) for row in x]
        present = [i for i, k in enumerate(keys) if k in stored]
        if present:  # what the memory will classify in this step, with the model as it is now
            examples = torch.stack([stored[keys[i]][0] for i in present])
            model.eval()
            with torch.no_grad():
                now_correct = model(examples).argmax(1) == y[present]
            model.train()
            for j, i in enumerate(present):
                fooled_then, correct_now = stored[keys[i]][1], bool(now_correct[j])
                counts[0] += 1
                counts[1] += correct_now
                counts[2] += (not fooled_then) and not correct_now
                counts[3] += fooled_then and correct_now
        fooled = out.adv_logits.argmax(1) != y
        for i, key in enumerate(keys):
            stored[key] = (out.adv[i].detach().clone(), bool(fooled[i]))
        return out

    monkeypatch.setattr(training_module, "base_objective", lambda method: objective)
    run.fit()
    for record in run.history:
        classified, correct, forgotten, recovered = expected[record["epoch"]]
        assert record["rows_classified"] == classified
        assert record["rows_forgotten"] == forgotten
        assert record["rows_recovered"] == recovered
        if classified:
            assert record["memory_accuracy"] == pytest.approx(correct / classified)
        else:
            assert record["memory_accuracy"] is None
    assert [record["rows_classified"] for record in run.history] == [0, 96, 96]
    assert run.history[0]["memory_mean_term"] is None and run.history[1]["memory_mean_term"] > 0
    assert set(run.history[0]) == set(EPOCH_COLUMNS)


def test_records_without_memory_leave_memory_figures_empty():
    run = TrainingRun(_config(memory=False, epochs=1, curve_samples=10), _tiny_splits())
    record = run.fit()[0]
    assert record.rows_classified is None and record.memory_accuracy is None
    assert record.curve_pgd_accuracy is not None and record.holdout_pgd_accuracy is None
    assert record.cpu_seconds > 0 and record.seconds > 0


def test_curve_is_clean_and_pgd_accuracy_on_the_first_test_samples():
    splits = _tiny_splits()
    run = TrainingRun(_config(memory=False, epochs=1, curve_samples=12, eps=EPS), splits)
    record = run.fit()[0]
    model = run.model.eval()
    x, y = splits.test.tensors[0][:12], splits.test.tensors[1][:12]
    with torch.no_grad():
        clean = int((model(x).argmax(1) == y).sum())
    assert record.curve_clean_accuracy == clean / 12
    assert record.curve_pgd_accuracy <= record.curve_clean_accuracy


# -- held-out split and best weights --------------------------------------------------------------


def _labelled_splits() -> DatasetSplits:
    """96 random images with class sizes 40, 20 and 36 (a quarter of each: 10, 5 and 9)."""
    generator = torch.Generator().manual_seed(5)
    x = torch.rand(136, 1, 8, 8, generator=generator)
    y = torch.tensor([0] * 40 + [1] * 20 + [2] * 36 + [0, 1, 2, 3] * 10)
    return DatasetSplits(
        name="digits",
        train=IndexedDataset(TensorDataset(x[:96], y[:96])),
        test=TensorDataset(x[96:], y[96:]),
        num_classes=4,
        sample_shape=(1, 8, 8),
        synthetic=True,
    )


def test_holdout_is_stratified_fixed_and_never_trained_on(monkeypatch):
    splits = _labelled_splits()
    config = _config(memory=True, epochs=2, holdout=24, method="trades")
    run = TrainingRun(config, splits)
    spy = _spy(monkeypatch, run)
    run.fit()
    held = [run.holdout_set[i] for i in range(len(run.holdout_set))]
    held_keys = {_row_key(x) for x, _ in held}
    labels = [int(y) for _, y in held]
    assert [labels.count(c) for c in range(3)] == [10, 5, 9]
    trained = {_row_key(row) for call in spy.calls for row in call["x"]}
    assert not trained & held_keys
    all_train = {_row_key(row) for row in splits.train.dataset.tensors[0]}
    assert trained | held_keys == all_train and len(trained) == 72
    test_keys = {_row_key(row) for row in splits.test.tensors[0]}
    assert not held_keys & test_keys
    assert run.memory.num_samples == 72
    other = TrainingRun(_config(memory=True, epochs=2, holdout=24, seed=11), splits)
    assert list(other.holdout_set.indices) == list(run.holdout_set.indices)


def test_best_weights_are_those_of_the_best_held_out_epoch(tmp_path):
    splits = _labelled_splits()
    run = TrainingRun(_config(memory=True, epochs=4, holdout=24, eps=EPS), splits)
    states = []
    run.fit(
        checkpoint_path=tmp_path / "ckpt.pt",
        on_epoch_end=lambda stats: states.append(
            {k: v.clone() for k, v in run.model.state_dict().items()}
        ),
    )
    accuracies = [h["holdout_pgd_accuracy"] for h in run.history]
    best_epoch = accuracies.index(max(accuracies)) + 1  # the earliest of equals
    assert run.best["epoch"] == best_epoch
    assert run.best["holdout_pgd_accuracy"] == max(accuracies)
    state = load_checkpoint(tmp_path / "ckpt.pt")
    best_model = model_from_checkpoint(state, weights="best")
    last_model = model_from_checkpoint(state, weights="last")
    for key, value in states[best_epoch - 1].items():
        assert torch.equal(best_model.state_dict()[key], value), key
    for key, value in states[-1].items():
        assert torch.equal(last_model.state_dict()[key], value), key


def test_best_weights_need_a_held_out_split(tmp_path):
    run = TrainingRun(_config(memory=False, epochs=1), _tiny_splits())
    run.fit(checkpoint_path=tmp_path / "ckpt.pt")
    assert run.best is None
    with pytest.raises(ValueError, match="--holdout"):
        model_from_checkpoint(load_checkpoint(tmp_path / "ckpt.pt"), weights="best")
    with pytest.raises(ValueError, match="holdout"):
        run.model_with("best")


def test_holdout_must_leave_training_samples():
    with pytest.raises(ValueError, match="holdout"):
        TrainingRun(_config(holdout=96), _tiny_splits())


# -- resume with every feature on -----------------------------------------------------------------


@pytest.mark.parametrize("method", ["trades", "hat"])
def test_resume_with_the_new_features_is_bit_identical(tmp_path, method):
    splits = _labelled_splits()
    options = dict(
        method=method,
        epochs=4,
        attack_init="memory",
        attack_reset_every=2,
        diagnostics=True,
        replay_fraction=0.5,
        holdout=16,
        curve_samples=16,
        milestones=(0.6, 0.8),
    )
    straight = TrainingRun(_config(**options), splits)
    straight.fit()
    first = TrainingRun(_config(**options), splits)
    first.fit(until_epoch=2, checkpoint_path=tmp_path / "ckpt.pt")
    torch.manual_seed(999)
    random.seed(999)
    resumed = TrainingRun.resume(tmp_path / "ckpt.pt", splits)
    resumed.fit()
    a, b = straight.state_dict(), resumed.state_dict()
    for key in ("model", "optimizer", "scheduler", "memory", "helper", "history", "best"):
        _assert_same_state(a[key], b[key], key)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


# -- learning-rate schedule ----------------------------------------------------------------------


def test_milestones_set_the_drops_for_every_method():
    splits = _tiny_splits()  # 3 steps per epoch, 12 in 4 epochs: drops after steps 9 and 11
    for method in ("pgd_at", "hat"):  # HAT's one-cycle gives way to the piecewise schedule
        config = _config(method=method, epochs=4, memory=False, lr=0.1, milestones=(0.75, 0.9))
        run = TrainingRun(config, splits)
        run.fit()
        assert [h["lr"] for h in run.history] == pytest.approx([0.1, 0.1, 0.01, 0.001])
        assert run.schedule_description() == (
            "lr 0.1, x0.1 twice in epoch 4 (after steps 9 and 11 of 12)"
        )


def test_schedule_description_names_the_epochs_of_the_drops():
    # issue 13: 3 epochs on digits (12 batches each) went 0.05 -> 0.005 -> 0.0005
    config = TrainConfig(method="trades", epochs=3)
    assert describe_lr_schedule(config, steps_per_epoch=12) == (
        "lr 0.05, x0.1 in epochs 2 and 3 (after steps 18 and 27 of 36)"
    )
    assert describe_lr_schedule(TrainConfig(method="trades", epochs=1), steps_per_epoch=1) == (
        "lr 0.05, constant"
    )


# -- config checks --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "error", "match"),
    [
        ("attack_init", "zeros", ValueError, "attack_init"),
        ("attack_reset_every", 0, ValueError, "attack_reset_every"),
        ("replay_fraction", 1.5, ValueError, "replay_fraction"),
        ("replay_fraction", 0.0, ValueError, "replay_fraction"),
        ("milestones", (0.75, 0.5), ValueError, "increase"),
        ("milestones", (0.5, 1.0), ValueError, r"\(0, 1\)"),
        ("milestones", "0.5", TypeError, "milestones"),
        ("holdout", -1, ValueError, "holdout"),
        ("curve_samples", 0, ValueError, "curve_samples"),
        ("diagnostics", 1, TypeError, "diagnostics"),
    ],
)
def test_config_rejects_bad_new_values(field, value, error, match):
    with pytest.raises(error, match=match):
        _config(**{field: value})


def test_reset_needs_memory_started_attacks():
    with pytest.raises(ValueError, match="attack_init='memory'"):
        _config(attack_reset_every=10)


def test_config_new_fields_round_trip_and_old_dicts_still_load():
    config = _config(attack_init="memory", milestones=[0.75, 0.9], holdout=3, curve_samples=5)
    assert config.milestones == (0.75, 0.9)
    assert TrainConfig.from_dict(config.to_dict()) == config
    old = {k: v for k, v in config.to_dict().items() if k not in ("attack_init", "holdout")}
    assert TrainConfig.from_dict(old).attack_init == "random"


def test_memory_exists_for_each_use_and_has_weight_zero_without_memloss():
    splits = _tiny_splits()
    assert TrainingRun(_config(memory=False), splits).memory is None
    for extra in ({"attack_init": "memory"}, {"diagnostics": True}):
        memory = TrainingRun(_config(memory=False, **extra), splits).memory
        assert memory is not None and memory.beta_prime == 0.0
    config = _config(memory=True, replay_fraction=0.25, diagnostics=True)
    memory = TrainingRun(config, splits).memory
    assert memory.beta_prime == 2.0 and memory.replay_fraction == 0.25 and memory.diagnostics
