"""The loss each integration patch produces, on fixed tensors.

A patched repository computes its own loss, and the patch adds two calls: ``memloss.record(adv,
logits)`` where the loss function has its adversarial examples and clean logits, and ``loss = loss
+ memloss.term(model, idx, x, y)`` in the loop. Here the repository's loss is played by the
matching reference objective of ``memloss_addon.objectives`` (TRADES, MART, HAT, Squeeze
Training), and the patched loss is checked against the MemLoss formula written out in tests.helpers.
"""

from __future__ import annotations

import argparse
import functools
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from memloss_addon.integrations.hook import HookSettings, TrainingHook, keep_cuda_calls_on_cpu
from memloss_addon.objectives import hat, mart, squeeze, trades
from tests.helpers import term_by_hand

ATTACK = {"eps": 8 / 255, "step_size": 2 / 255, "steps": 2}
NUM_SAMPLES, BATCH, FEATURES, CLASSES = 6, 3, 4, 3


def helper_model() -> nn.Module:
    torch.manual_seed(11)
    return nn.Linear(FEATURES, CLASSES)


# integration name -> the repository's loss, as the reference objective with the method's beta
OBJECTIVES = {
    "trades": functools.partial(trades, beta=6.0, **ATTACK),
    "mart": functools.partial(mart, beta=6.0, **ATTACK),
    "hat": functools.partial(hat, beta=2.5, gamma=0.5, h=2.0, helper=helper_model(), **ATTACK),
    "st": functools.partial(squeeze, beta=6.0, **ATTACK),
}


def make_model(*, batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(5)
    if batchnorm:
        return nn.Sequential(
            nn.Linear(FEATURES, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, CLASSES)
        )
    return nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, CLASSES))


def make_loader(*, shuffle: bool = True) -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(NUM_SAMPLES, FEATURES, generator=generator)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=shuffle)


def expected_term(model, x, y, memory_rows, beta_prime):
    """beta' / B * sum_i (1 - p_y(m_i)) * KL(p(x_i) || p(m_i)), one sample at a time.

    The weight carries no gradient (the default); the term keeps the graph, in float32.
    """
    clean_logits = [model(x[i : i + 1])[0] for i in range(len(x))]
    memory_logits = [[model(memory_rows[i : i + 1])[0]] for i in range(len(x))]
    return term_by_hand(clean_logits, memory_logits, y, beta_prime=beta_prime).float()


def patched_step(hook, objective, model, x, y, idx):
    """What a patched training step computes: the repository's loss plus the memory term."""
    out = objective(model, x, y)
    hook.record(out.adv, out.logits)  # the line added to the repository's loss function
    return out, out.loss + hook.term(model, idx, x, y)  # the line added to the loop


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_patched_loss_is_base_loss_plus_memloss_term(name):
    objective, model, hook = OBJECTIVES[name], make_model(), TrainingHook()
    loader = hook.indexed(make_loader())
    stored = {}
    for x, y, idx in loader:  # epoch 1: the memory is empty, the loss is the base loss
        out, loss = patched_step(hook, objective, model, x, y, idx)
        assert torch.equal(loss, out.loss)
        stored.update({int(i): row for i, row in zip(idx, out.adv, strict=True)})
    for x, y, idx in loader:  # epoch 2: the term compares against last epoch's examples
        out, loss = patched_step(hook, objective, model, x, y, idx)
        memory_rows = torch.stack([stored[int(i)] for i in idx])
        reference = out.loss + expected_term(model, x, y, memory_rows, beta_prime=2.0)
        torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
        assert (loss - out.loss).detach().item() > 0  # the term is a positive, weighted KL here
        grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
        expected = torch.autograd.grad(reference, list(model.parameters()))
        for got, want in zip(grads, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_beta_prime_zero_gives_the_base_loss_exactly(name):
    objective = OBJECTIVES[name]
    model = make_model(batchnorm=True)
    model.train()
    hook = TrainingHook(settings=HookSettings(beta_prime=0.0))
    loader = hook.indexed(make_loader())
    for _ in range(2):  # the second epoch has a full memory
        for x, y, idx in loader:
            out = objective(model, x, y)
            hook.record(out.adv, out.logits)
            rng, bn = torch.get_rng_state(), model[1].running_mean.clone()
            term = hook.term(model, idx, x, y)
            # The term is an exact zero, draws no random numbers and runs no forward pass.
            assert torch.equal(out.loss + term, out.loss)
            assert torch.equal(torch.get_rng_state(), rng)
            assert torch.equal(model[1].running_mean, bn)
    assert hook.memory.stats()["filled_fraction"] == 1.0  # it still stores


def test_indexed_loader_keeps_order_and_random_stream():
    loader, hook = make_loader(), TrainingHook()
    dataset = loader.dataset
    torch.manual_seed(3)
    plain = [x for x, _ in loader]
    after_plain = torch.get_rng_state()
    torch.manual_seed(3)
    indexed = list(hook.indexed(loader))
    assert torch.equal(torch.get_rng_state(), after_plain)
    for x_plain, (x, y, idx) in zip(plain, indexed, strict=True):
        assert torch.equal(x, x_plain)
        assert torch.equal(x, dataset.tensors[0][idx])
        assert torch.equal(y, dataset.tensors[1][idx])
    assert hook.indexed(loader) is hook.indexed(loader)
    with pytest.raises(TypeError, match="DataLoader"):
        hook.indexed([1, 2, 3])


def test_hat_style_metrics_include_the_term():
    model, hook = make_model(), TrainingHook()
    loader = hook.indexed(make_loader(shuffle=False))
    for _ in range(2):
        for x, y, idx in loader:
            out = OBJECTIVES["hat"](model, x, y)
            metrics = {"loss": out.loss.item()}
            hook.record(out.adv, out.logits)
            term = hook.term(model, idx, x, y, metrics=metrics)
            assert metrics["loss"] == pytest.approx(out.loss.item() + term.item(), abs=1e-9)


def test_term_needs_a_record_and_an_indexed_loader():
    model, x, y = make_model(), torch.rand(BATCH, FEATURES), torch.tensor([0, 1, 2])
    hook = TrainingHook()
    with pytest.raises(RuntimeError, match="no adversarial examples were recorded"):
        hook.term(model, torch.arange(BATCH), x, y)
    hook.record(x, model(x))
    with pytest.raises(RuntimeError, match="memloss.indexed"):
        hook.term(model, torch.arange(BATCH), x, y)


def test_flags_are_added_and_captured(tmp_path):
    parser = argparse.ArgumentParser()
    parser.add_argument("--beta", type=float, default=6.0)
    hook = TrainingHook()
    hook.add_arguments(parser)
    args = parser.parse_args([])
    assert args.beta_prime == 2.0 and hook.settings == HookSettings()
    args = parser.parse_args(
        [
            "--beta-prime",
            "0",
            "--mem-depth",
            "2",
            "--mem-dtype",
            "float16",
            "--mem-weighting",
            "none",
            "--beta",
            "3",
        ]
    )
    assert args.beta == 3.0
    assert hook.settings == HookSettings(beta_prime=0.0, depth=2, dtype="float16", weighting="none")
    with pytest.raises(SystemExit):
        parser.parse_args(["--mem-dtype", "float64"])


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="float64"):
        HookSettings(dtype="float64")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="margin"):
        HookSettings(weighting="margin")  # type: ignore[arg-type]


def test_settings_reach_the_memory():
    hook = TrainingHook(
        settings=HookSettings(beta_prime=1.5, depth=2, dtype="float16", weighting="none")
    )
    model = make_model()
    ((x, y, idx),) = [next(iter(hook.indexed(make_loader())))]
    hook.record(x, model(x))
    hook.term(model, idx, x, y)
    memory = hook.memory
    assert (memory.beta_prime, memory.depth, memory.dtype, memory.num_samples) == (
        1.5,
        2,
        torch.float16,
        NUM_SAMPLES,
    )
    assert memory.sample_shape == (FEATURES,)


def test_save_and_resume_continue_the_memory(tmp_path):
    model, objective = make_model(), OBJECTIVES["trades"]
    first = TrainingHook()
    loader = first.indexed(make_loader(shuffle=False))
    for x, y, idx in loader:
        patched_step(first, objective, model, x, y, idx)
    path = tmp_path / "memory-last.pt"
    first.save(path, epoch=1)

    second = TrainingHook()
    second.indexed(make_loader(shuffle=False))
    second.resume(path, epoch=1)
    for x, y, idx in loader:
        out = objective(model, x, y)
        first.record(out.adv, out.logits)
        second.record(out.adv, out.logits)
        want = first.term(model, idx, x, y)
        got = second.term(model, idx, x, y)
        assert want.item() > 0
        assert torch.equal(got, want)


def test_resume_from_the_command_line(tmp_path):
    model = make_model()
    first = TrainingHook()
    x, y, idx = next(iter(first.indexed(make_loader(shuffle=False))))
    first.record(x * 0.5, model(x))  # stored examples that differ from the clean inputs
    first.term(model, idx, x, y)
    path = tmp_path / "memory.pt"
    first.save(path, epoch=7)

    parser = argparse.ArgumentParser()
    second = TrainingHook()
    second.add_arguments(parser)
    parser.parse_args(["--mem-resume", str(path)])
    second.indexed(make_loader(shuffle=False))
    second.record(x, model(x))
    assert second.term(model, idx, x, y).item() > 0  # memory from the file: the term is active


def test_resume_warns_on_missing_file_and_epoch_mismatch(tmp_path):
    hook = TrainingHook()
    with pytest.warns(UserWarning, match="not found; the memory starts empty"):
        hook.resume(tmp_path / "absent.pt")
    model = make_model()
    x, y, idx = next(iter(hook.indexed(make_loader(shuffle=False))))
    hook.record(x, model(x))
    hook.term(model, idx, x, y)
    hook.save(tmp_path / "m.pt", epoch=3)
    with pytest.warns(UserWarning, match="from epoch 3, the model from epoch 4"):
        hook.resume(tmp_path / "m.pt", epoch=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hook.resume(tmp_path / "m.pt", epoch=3)
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a memory checkpoint"):
        hook.resume(tmp_path / "other.pt")


def test_save_before_the_first_step_writes_nothing(tmp_path):
    TrainingHook().save(tmp_path / "m.pt", epoch=1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback acts only without CUDA")
def test_cuda_calls_stay_on_cpu_and_can_be_undone():
    original = torch.Tensor.cuda
    undo = keep_cuda_calls_on_cpu()
    try:
        x = torch.ones(2)
        assert x.cuda() is x
    finally:
        undo()
    assert torch.Tensor.cuda is original
