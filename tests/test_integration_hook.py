"""The hook features the newer patches use: tracked loaders, a term without recorded tensors
(PGD-AT: the hook runs the clean pass itself), inputs normalised by the repository, memory-started
attacks (``--mem-attack-init``), options a patch refuses, and an AWP-style step.

Expected values come from the formula in tests.helpers and from plain loops, not from the hook.
"""

from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from memloss_addon.integrations.hook import HookSettings, TrainingHook
from tests.helpers import term_by_hand

NUM_SAMPLES, BATCH, FEATURES, CLASSES = 6, 3, 4, 3
EPS = 0.1


def make_model(*, batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(5)
    if batchnorm:
        return nn.Sequential(
            nn.Linear(FEATURES, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, CLASSES)
        )
    return nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, CLASSES))


def make_loader(*, shuffle: bool = True, samples: int = NUM_SAMPLES) -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(samples, FEATURES, generator=generator) * 0.8 + 0.1
    y = torch.arange(samples) % CLASSES
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=shuffle)


def adversarial(x: torch.Tensor, epoch: int) -> torch.Tensor:
    """A made-up attack output: inside the eps-ball and [0, 1], different every epoch."""
    return (x + EPS * torch.sin(7 * x + epoch)).clamp(0, 1)


class Counting(nn.Module):
    """Counts forward passes of the wrapped model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.model(x)


def normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - 0.5) / 0.25


# ---------------------------------------------------------------- tracked loaders


def test_tracked_loader_keeps_batches_order_and_random_stream_and_tells_the_indices():
    loader, hook = make_loader(), TrainingHook()
    dataset = loader.dataset
    torch.manual_seed(3)
    plain = list(loader)
    after_plain = torch.get_rng_state()
    torch.manual_seed(3)
    tracked = hook.tracked(loader)
    seen = []
    for (x, y), (x_plain, y_plain) in zip(tracked, plain, strict=True):
        idx = hook._current_idx
        assert torch.equal(x, x_plain) and torch.equal(y, y_plain)
        assert torch.equal(x, dataset.tensors[0][idx])
        seen.append(idx)
    assert torch.equal(torch.get_rng_state(), after_plain)
    assert hook._current_idx is None  # cleared when the loop ends
    assert sorted(torch.cat(seen).tolist()) == list(range(NUM_SAMPLES))
    assert hook.tracked(loader) is tracked and hook.indexed(loader) is not tracked
    assert len(tracked) == len(loader)
    with pytest.raises(TypeError, match="DataLoader"):
        hook.tracked([1, 2])


def test_term_without_indices_uses_the_tracked_batch_and_needs_one():
    model, hook = make_model(), TrainingHook()
    x, y = torch.rand(BATCH, FEATURES), torch.tensor([0, 1, 2])
    with pytest.raises(RuntimeError, match="no dataset indices"):
        hook.term(model, None, x, y, adv=x)
    loader = hook.tracked(make_loader(shuffle=False))
    for x, y in loader:  # the indices are known while the loop is on this batch
        hook.term(model, None, x, y, adv=adversarial(x, 0))
        break
    assert hook.memory.stats()["rows_written"] == BATCH


# ---------------------------------------------------------------- PGD-AT: no clean logits passed


def pgd_at_epochs(hook: TrainingHook, model: nn.Module, *, epochs: int = 2):
    """A PGD-AT-style loop (loss on adversarial examples only) with the term added."""
    loader = hook.tracked(make_loader())
    losses = []
    for epoch in range(epochs):
        for x, y in loader:
            adv = adversarial(x, epoch)
            base = nn.functional.cross_entropy(model(normalize(adv)), y)
            term = hook.term(model, None, x, y, adv=adv, preprocess=normalize)
            losses.append((epoch, base, term))
    return losses


def test_pgd_at_term_runs_no_pass_in_the_first_epoch_and_matches_the_formula_after():
    torch.manual_seed(0)
    inner = make_model()
    model, hook = Counting(inner), TrainingHook()
    stored: dict[int, torch.Tensor] = {}
    loader = hook.tracked(make_loader())
    for epoch in range(2):
        for x, y in loader:
            idx = hook._current_idx.clone()
            adv = adversarial(x, epoch)
            calls = model.calls
            term = hook.term(model, None, x, y, adv=adv, preprocess=normalize)
            if epoch == 0:
                assert model.calls == calls and term.item() == 0.0  # no clean pass, no memory pass
            else:
                assert model.calls == calls + 2  # the clean pass and the memory pass
                clean = [inner(normalize(x[i : i + 1]))[0] for i in range(BATCH)]
                memory = [[inner(normalize(stored[int(i)][None]))[0]] for i in idx]
                want = term_by_hand(clean, memory, y, beta_prime=2.0).float()
                torch.testing.assert_close(term, want, rtol=1e-5, atol=1e-6)
                grads = torch.autograd.grad(term, list(inner.parameters()), retain_graph=True)
                wants = torch.autograd.grad(want, list(inner.parameters()))
                for got, expected in zip(grads, wants, strict=True):
                    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
            stored.update({int(i): row for i, row in zip(idx, adv, strict=True)})


def test_pgd_at_clean_pass_leaves_batchnorm_statistics_alone():
    model, hook = make_model(batchnorm=True), TrainingHook()
    model.train()
    loader = hook.tracked(make_loader(shuffle=False))
    for epoch in range(2):
        for x, y in loader:
            hook.term(model, None, x, y, adv=adversarial(x, epoch))
    # Only the memory passes of epoch 2 (2 batches) moved the running statistics.
    assert int(model[1].num_batches_tracked) == 2


def test_pgd_at_with_beta_prime_zero_runs_nothing_and_draws_nothing():
    model = Counting(make_model(batchnorm=True))
    model.train()
    hook = TrainingHook(settings=HookSettings(beta_prime=0.0))
    loader = hook.tracked(make_loader())
    for epoch in range(2):
        for x, y in loader:
            rng, stats = torch.get_rng_state(), model.model[1].running_mean.clone()
            term = hook.term(model, None, x, y, adv=adversarial(x, epoch), preprocess=normalize)
            assert term.item() == 0.0 and not term.requires_grad
            assert torch.equal(torch.get_rng_state(), rng)
            assert torch.equal(model.model[1].running_mean, stats)
    assert model.calls == 0
    assert hook.memory.stats()["filled_fraction"] == 1.0  # it still stores


def test_term_stores_whatever_mode_the_model_is_in():
    model, hook = make_model(), TrainingHook()
    model.eval()  # a repository that leaves the model in eval mode after its attack
    loader = hook.tracked(make_loader(shuffle=False))
    with pytest.warns() as record:
        for x, y in loader:
            hook.term(model, None, x, y, adv=adversarial(x, 0))
        import warnings

        warnings.warn("sentinel", UserWarning, stacklevel=1)
    assert [str(w.message) for w in record] == ["sentinel"]
    assert hook.memory.stats()["rows_written"] == NUM_SAMPLES


# ---------------------------------------------------------------- AWP: perturbed weights


def test_awp_style_step_computes_the_term_on_the_perturbed_weights():
    """The patch adds the term between AWP's perturb() and restore(): the memory's pass and the
    clean pass run on the perturbed weights, the gradient is taken there, and restore() leaves
    the weights as the optimizer step made them."""
    torch.manual_seed(0)
    model, hook = make_model(), TrainingHook()
    loader = hook.tracked(make_loader(shuffle=False))
    stored: dict[int, torch.Tensor] = {}
    for epoch in range(2):
        for x, y in loader:
            idx = hook._current_idx.clone()
            adv = adversarial(x, epoch)
            diff = [0.01 * torch.sin(p.detach() * 3 + 1) for p in model.parameters()]
            with torch.no_grad():  # AWP: perturb
                for p, d in zip(model.parameters(), diff, strict=True):
                    p.add_(d)
            perturbed = [p.detach().clone() for p in model.parameters()]
            term = hook.term(model, None, x, y, adv=adv)
            if epoch == 1:
                reference = make_model()
                with torch.no_grad():
                    for p, q in zip(reference.parameters(), perturbed, strict=True):
                        p.copy_(q)
                clean = [reference(x[i : i + 1])[0] for i in range(BATCH)]
                memory = [[reference(stored[int(i)][None])[0]] for i in idx]
                want = term_by_hand(clean, memory, y, beta_prime=2.0).float()
                torch.testing.assert_close(term, want, rtol=1e-5, atol=1e-6)
                grads = torch.autograd.grad(term, list(model.parameters()))
                wants = torch.autograd.grad(want, list(reference.parameters()))
                for got, expected in zip(grads, wants, strict=True):
                    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
            with torch.no_grad():  # AWP: restore
                for p, d in zip(model.parameters(), diff, strict=True):
                    p.sub_(d)
            stored.update({int(i): row for i, row in zip(idx, adv, strict=True)})


# ---------------------------------------------------------------- --mem-attack-init


def start_of(hook: TrainingHook, x: torch.Tensor, start: torch.Tensor, **kwargs) -> torch.Tensor:
    return hook.attack_init(x, start, EPS, **kwargs)


def test_attack_init_is_a_no_op_without_the_flag():
    hook = TrainingHook()
    loader = hook.tracked(make_loader(shuffle=False))
    model = make_model()
    for epoch in range(2):
        for x, y in loader:
            start = x + 0.01
            assert start_of(hook, x, start) is start
            hook.term(model, None, x, y, adv=adversarial(x, epoch))


def l_inf_projection(example: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Per pixel: the nearest value to ``example`` in [clean - eps, clean + eps] and [0, 1]."""
    out = example.clone()
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            low, high = max(clean[i, j] - EPS, 0.0), min(clean[i, j] + EPS, 1.0)
            out[i, j] = min(max(float(example[i, j]), float(low)), float(high))
    return out


def test_attack_init_starts_from_the_stored_example_where_there_is_one():
    hook = TrainingHook(settings=HookSettings(beta_prime=0.0, attack_init=True))
    model = make_model()
    loader = hook.tracked(make_loader(shuffle=False))
    stored: dict[int, torch.Tensor] = {}
    # Epoch 1 stores only the first batch; shift the clean inputs so projection matters.
    for number, (x, y) in enumerate(loader):
        start = x + 0.001
        assert start_of(hook, x, start) is start  # nothing stored for these samples yet
        if number == 0:
            idx = hook._current_idx.clone()
            adv = (x + 3 * EPS * torch.sign(torch.sin(11 * x))).clamp(0, 1)  # beyond the ball
            hook.term(model, None, x, y, adv=adv)
            stored.update({int(i): row for i, row in zip(idx, adv, strict=True)})
    for x, y in loader:
        idx = hook._current_idx.clone()
        moved = (x + 0.05).clamp(0, 1)  # this epoch's (differently augmented) inputs
        start = moved + 0.001
        rng = torch.get_rng_state()
        got = start_of(hook, moved, start)
        got_delta = start_of(hook, moved, start - moved, delta=True)
        assert torch.equal(torch.get_rng_state(), rng)
        for row, i in enumerate(idx.tolist()):
            if i in stored:
                want = l_inf_projection(stored[i][None], moved[row : row + 1])[0]
                torch.testing.assert_close(got[row], want, rtol=0, atol=1e-6)
                torch.testing.assert_close(got_delta[row], want - moved[row], rtol=0, atol=1e-6)
            else:
                assert torch.equal(got[row], start[row])  # the repository's own start
                assert torch.equal(got_delta[row], (start - moved)[row])
        hook.term(model, None, moved, y, adv=moved)


def test_attack_init_l2_rescales_into_the_ball():
    hook = TrainingHook(settings=HookSettings(beta_prime=0.0, attack_init=True))
    model = make_model()
    loader = hook.tracked(make_loader(shuffle=False, samples=BATCH))
    for x, y in loader:
        hook.term(model, None, x, y, adv=(x + 0.3).clamp(0, 1))
    for x, _ in loader:
        delta = start_of(hook, x, torch.zeros_like(x), norm="l_2", delta=True)
        move = (x + 0.3).clamp(0, 1) - x
        for row in range(BATCH):
            norm = float(move[row].norm())
            want = move[row] * (EPS / norm if norm > EPS else 1.0)
            torch.testing.assert_close(delta[row], (x[row] + want).clamp(0, 1) - x[row])
            assert float(delta[row].norm()) <= EPS + 1e-6
    with pytest.raises(ValueError, match="norm"):
        for x, _ in loader:
            start_of(hook, x, x, norm="l_1")  # type: ignore[arg-type]


def test_attack_init_outside_a_training_batch_keeps_the_start():
    hook = TrainingHook(settings=HookSettings(attack_init=True))
    model = make_model()
    loader = hook.tracked(make_loader(shuffle=False))
    for epoch in range(2):
        for x, y in loader:
            hook.term(model, None, x, y, adv=adversarial(x, epoch))
    x = torch.rand(BATCH, FEATURES)  # an evaluation batch, after the training loop
    start = x + 0.001
    assert start_of(hook, x, start) is start
    for _ in loader:  # in a training batch, but x is of another size
        wrong = torch.rand(BATCH + 1, FEATURES)
        assert start_of(hook, wrong, wrong) is wrong
        break


# ---------------------------------------------------------------- flags and refused options


def repository_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mixup", action="store_true")
    parser.add_argument("--attack", default="pgd", choices=["pgd", "fgsm", "free", "none"])
    return parser


def test_mem_attack_init_flag_is_captured():
    parser, hook = repository_parser(), TrainingHook()
    hook.add_arguments(parser)
    parser.parse_args([])
    assert hook.settings.attack_init is False
    parser.parse_args(["--mem-attack-init", "--beta-prime", "0"])
    assert hook.settings == HookSettings(beta_prime=0.0, attack_init=True)


@pytest.mark.parametrize(
    ("argv", "refused"),
    [
        (["--mixup"], "--mixup is not supported"),
        (["--attack", "none"], "--attack none is not supported"),
        (["--attack", "free", "--beta-prime", "0", "--mem-attack-init"], "--attack free is not"),
        (["--attack", "fgsm"], None),
        (["--mixup", "--beta-prime", "0"], None),
        (["--attack", "none", "--beta-prime", "0"], None),
    ],
)
def test_unsupported_options_are_refused_while_the_memory_is_on(capsys, argv, refused):
    parser, hook = repository_parser(), TrainingHook()
    hook.add_arguments(parser, unsupported={"mixup": [True], "attack": ["free", "none"]})
    if refused is None:
        parser.parse_args(argv)
        return
    with pytest.raises(SystemExit) as error:
        parser.parse_args(argv)
    assert error.value.code == 2
    message = capsys.readouterr().err
    assert refused in message and "--beta-prime 0" in message
