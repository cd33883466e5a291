"""Small models and plain-loop references (MemLoss term, L-inf PGD), independent of the library."""

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
        total = torch.zeros((), dtype=torch.float64)
        for b in range(batch):
            stored = self.slots.get(int(indices[b]), [])
            for example in stored:
                memory_logits = self.model(example.to(clean.dtype).unsqueeze(0))[0]
                kl = kl_by_hand(logits[b], memory_logits)
                if self.weighting == "difficulty":
                    q_true = torch.exp(log_softmax_by_hand(memory_logits)[int(targets[b])])
                    weight = 1 - q_true
                    if self.detach_weight:
                        weight = weight.detach()
                else:
                    weight = 1.0
                total = total + weight * kl / len(stored)
        last_row = {int(indices[b]): b for b in range(batch)}  # a later duplicate overwrites
        for index, b in last_row.items():
            kept = self.slots.get(index, [])[: self.depth - 1]
            self.slots[index] = [adv[b].detach().to(self.store_dtype)] + kept
        return total * self.beta_prime / batch


def epoch_batches(num_samples: int, batch_size: int, epoch: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + epoch)
    order = torch.randperm(num_samples, generator=generator)
    return [order[i : i + batch_size] for i in range(0, num_samples, batch_size)]


def adversarial_stand_in(x: torch.Tensor, epoch: int, eps: float = 0.1) -> torch.Tensor:
    """A deterministic perturbation, different each epoch, inside the eps-ball and [0, 1]."""
    signs = torch.sign(torch.sin(x * 37.0 + epoch))
    return (x + eps * signs).clamp(0.0, 1.0)


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
