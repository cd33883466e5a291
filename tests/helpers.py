"""Small models, plain-loop references (MemLoss term, L-inf PGD) and state checks for tests.

Independent of the library: nothing here imports memloss_addon (memories are passed in).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp(in_features: int = 4, classes: int = 3, *, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A BatchNorm-free model, so a per-sample forward equals a batched one."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(in_features, 6), nn.Tanh(), nn.Linear(6, classes)).to(dtype)


def log_softmax_by_hand(z: torch.Tensor) -> torch.Tensor:
    """log p_c = z_c - log(sum_j exp(z_j)), written out for one 1-D logit vector."""
    shift = max(float(v.detach()) for v in z)
    total = sum(torch.exp(v - shift) for v in z)
    return torch.stack([v - shift - torch.log(total) for v in z])


def kl_by_hand(clean_logits: torch.Tensor, memory_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_c p_c (log p_c - log q_c) for one sample."""
    log_p = log_softmax_by_hand(clean_logits)
    log_q = log_softmax_by_hand(memory_logits)
    return sum(torch.exp(lp) * (lp - lq) for lp, lq in zip(log_p, log_q, strict=True))


def memloss_row_by_hand(
    clean_logits: torch.Tensor,
    memory_logits: torch.Tensor,
    target: int,
    *,
    weighting: str = "difficulty",
    detach_weight: bool = True,
) -> torch.Tensor:
    """(1 - q_y) * KL(p || q) for one sample and one memory example (1-D logits, in float64).

    p = softmax(clean_logits), q = softmax(memory_logits); the weight is 1 with weighting="none".
    """
    clean_logits, memory_logits = clean_logits.double(), memory_logits.double()
    kl = kl_by_hand(clean_logits, memory_logits)
    if weighting == "none":
        return kl
    weight = 1 - torch.exp(log_softmax_by_hand(memory_logits)[int(target)])
    return (weight.detach() if detach_weight else weight) * kl


def term_by_hand(
    clean_logits,
    memory_logits,
    targets,
    *,
    beta_prime: float,
    weighting: str = "difficulty",
    detach_weight: bool = True,
) -> torch.Tensor:
    """The MemLoss term of README's "The term", in float64, with a loop over samples and slots:

        beta' * (1/B) * sum_i (1/K_i) * sum_k (1 - q_y(m_ik)) * KL(p(x_i) || q(m_ik))

    ``clean_logits[i]`` is sample i's 1-D clean logits; ``memory_logits[i]`` is an iterable of
    the K_i 1-D logit vectors of its filled slots (a list, or a (K_i, C) tensor; empty: no slot,
    the sample contributes 0). For one slot per sample pass a (B, 1, C) tensor. Keeps the graph.
    """
    batch = len(targets)
    total = torch.zeros((), dtype=torch.float64)
    for b in range(batch):
        slots = list(memory_logits[b])
        for slot_logits in slots:
            row = memloss_row_by_hand(
                clean_logits[b],
                slot_logits,
                int(targets[b]),
                weighting=weighting,
                detach_weight=detach_weight,
            )
            total = total + row / len(slots)
    return total * beta_prime / batch


class ReferenceMemory:
    """The MemLoss term with a dict of per-sample lists and a loop over samples and slots."""

    def __init__(
        self,
        model,
        *,
        depth,
        beta_prime,
        weighting="difficulty",
        detach_weight=True,
        store_dtype=torch.float32,
    ):
        self.model = model
        self.depth = depth
        self.beta_prime = beta_prime
        self.weighting = weighting
        self.detach_weight = detach_weight
        self.store_dtype = store_dtype
        self.slots: dict[int, list[torch.Tensor]] = {}  # newest first

    def __call__(self, indices, clean, adv, logits, targets):
        batch = len(indices)
        memory_logits = [
            [
                self.model(example.to(clean.dtype).unsqueeze(0))[0]
                for example in self.slots.get(int(indices[b]), [])
            ]
            for b in range(batch)
        ]
        term = term_by_hand(
            logits,
            memory_logits,
            targets,
            beta_prime=self.beta_prime,
            weighting=self.weighting,
            detach_weight=self.detach_weight,
        )
        last_row = {int(indices[b]): b for b in range(batch)}  # a later duplicate overwrites
        for index, b in last_row.items():
            kept = self.slots.get(index, [])[: self.depth - 1]
            self.slots[index] = [adv[b].detach().to(self.store_dtype)] + kept
        return term


def epoch_batches(num_samples: int, batch_size: int, epoch: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + epoch)
    order = torch.randperm(num_samples, generator=generator)
    return [order[i : i + batch_size] for i in range(0, num_samples, batch_size)]


def adversarial_stand_in(x: torch.Tensor, epoch: int, eps: float = 0.1) -> torch.Tensor:
    """A deterministic perturbation, different each epoch, inside the eps-ball and [0, 1]."""
    signs = torch.sign(torch.sin(x * 37.0 + epoch))
    return (x + eps * signs).clamp(0.0, 1.0)


def run_epochs(
    memory,
    epochs,
    *,
    num_samples: int,
    sample_shape: tuple[int, ...],
    classes: int,
    batch_size: int,
    data_seed: int,
    dtype: torch.dtype = torch.float32,
) -> list[float]:
    """Calls ``memory`` over ``epoch_batches`` of fixed data for each epoch; returns the terms.

    Data: ``torch.rand`` from ``data_seed``, labels ``i % classes``, adv the epoch's
    ``adversarial_stand_in``, logits from ``memory.model`` (a MemoryWrapper or a ReferenceMemory).
    """
    generator = torch.Generator().manual_seed(data_seed)
    data = torch.rand(num_samples, *sample_shape, generator=generator, dtype=dtype)
    labels = torch.arange(num_samples) % classes
    terms = []
    for epoch in epochs:
        for idx in epoch_batches(num_samples, batch_size, epoch):
            x = data[idx]
            term = memory(idx, x, adversarial_stand_in(x, epoch), memory.model(x), labels[idx])
            terms.append(term.item())
    return terms


def snapshot(memory) -> dict:
    """A copy of ``memory.state_dict()`` (tensors cloned), for "memory unchanged" checks."""
    return {
        key: (value.clone() if torch.is_tensor(value) else value)
        for key, value in memory.state_dict().items()
    }


def assert_unchanged(before: dict, memory) -> None:
    """``memory``'s state equals the snapshot ``before``: same keys, tensors byte for byte."""
    after = snapshot(memory)
    assert before.keys() == after.keys()
    for key, value in before.items():
        if torch.is_tensor(value):
            assert value.dtype == after[key].dtype and value.shape == after[key].shape, key
            as_bytes = value.contiguous().reshape(-1).view(torch.uint8)
            assert torch.equal(as_bytes, after[key].contiguous().reshape(-1).view(torch.uint8)), key
        else:  # repr: a NaN counter (no term computed yet) equals itself
            assert repr(value) == repr(after[key]), key


def plain_pgd(model, x, y, *, eps, alpha, steps, loss, start):
    """Textbook L-inf PGD: sign steps on the summed loss, clip to the ball, then to [0, 1]."""
    adv = start.clone()
    rows = torch.arange(len(y))
    for _ in range(steps):
        adv.requires_grad_(True)
        z = model(adv)
        if loss == "ce":
            objective = F.cross_entropy(z, y, reduction="sum")
        else:
            others = z.clone()
            others[rows, y] = float("-inf")
            objective = (others.max(dim=1).values - z[rows, y]).sum()
        (grad,) = torch.autograd.grad(objective, adv)
        adv = adv.detach() + alpha * grad.sign()
        adv = torch.max(torch.min(adv, x + eps), x - eps).clamp(0.0, 1.0)
    return adv.detach()
