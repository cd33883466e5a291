"""The MemLoss term as a pure function of logits: no state, no model, no storage.

For a batch of ``B`` samples and ``R`` filled memory slots (row ``r`` belongs to sample ``s(r)`` and
its sample has ``K_s`` filled slots)::

    term = beta' * (1/B) * sum_r  w_r * KL( p(clean_s(r)) || p(memory_r) ) / K_s(r)
    w_r  = 1 - p_y(memory_r)       ("difficulty" weighting), or 1 ("none")

Both distributions come from ``log_softmax`` of logits upcast to at least fp32, with autocast
disabled, so the term is finite for large logits and under mixed precision. Gradient flows through
both the clean and the memory logits, as in the KL term of TRADES; the weight is detached unless
asked otherwise.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from .checks import check_choice
from .options import WEIGHTINGS, Weighting
from .store import transfer

__all__ = [
    "kl_rows",
    "log_probs",
    "memloss_term",
    "memory_kl_rows",
    "no_autocast",
    "upcast",
]


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """A context that turns autocast off on ``device`` (a no-op where it is off or absent)."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return _NO_CONTEXT


_NO_CONTEXT = contextlib.nullcontext()  # reusable: it holds no state


def upcast(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors as fp32; fp32 and fp64 unchanged.

    Example:
        >>> upcast(torch.zeros(1, dtype=torch.bfloat16)).dtype
        torch.float32
    """
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """``log_softmax`` over classes of logits upcast to at least fp32, with autocast off.

    Autocast would run ``log_softmax`` in bf16 on CPU, and ``log(softmax(z))`` overflows for large
    logits; this is the one place that turns logits into log-probabilities.

    Example:
        >>> log_probs(torch.tensor([[0.0, 0.0]])).exp()
        tensor([[0.5000, 0.5000]])
    """
    with no_autocast(logits.device):
        return F.log_softmax(upcast(logits), dim=1)


def kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-row ``KL(p || q)`` from log-probabilities (shape ``(B, C)`` -> ``(B,)``).

    Example:
        >>> log_p = torch.log(torch.tensor([[0.5, 0.5]]))
        >>> log_q = torch.log(torch.tensor([[0.25, 0.75]]))
        >>> round(kl_rows(log_p, log_q).item(), 4)  # 0.5 log 2 + 0.5 log(2/3)
        0.1438
    """
    with no_autocast(log_p.device):
        return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=1)


def memory_kl_rows(
    clean_logits: torch.Tensor,
    memory_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    weighting: Weighting = "difficulty",
    detach_weight: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row KL(p(clean) || p(memory)) and the row weights, in fp32 (fp64 for fp64 logits).

    Args:
        clean_logits: ``(R, C)`` clean logits, one row per memory row (already repeated per slot).
        memory_logits: ``(R, C)`` logits of the model on the memory examples.
        targets: ``(R,)`` integer labels.
        weighting: ``"difficulty"`` for ``1 - p_y(memory)`` or ``"none"`` for 1.
        detach_weight: stop the gradient through the weight (default ``True``).

    Returns:
        ``(kl, weight)``: two fp32 tensors of shape ``(R,)``.

    Example:
        >>> z = torch.tensor([[2.0, 0.0]])
        >>> kl, w = memory_kl_rows(z, z, torch.tensor([0]))
        >>> float(kl), round(float(w), 4)
        (0.0, 0.1192)
    """
    check_choice("weighting", weighting, WEIGHTINGS)
    log_p_memory = log_probs(memory_logits)
    kl = kl_rows(log_probs(clean_logits), log_p_memory)
    with no_autocast(kl.device):
        if weighting == "difficulty":
            p_true = log_p_memory.gather(1, targets.long().view(-1, 1)).squeeze(1).exp()
            weight = 1.0 - p_true
            if detach_weight:
                weight = weight.detach()
        else:
            weight = torch.ones_like(kl).detach()
    return kl, weight


def memloss_term(
    clean_logits: torch.Tensor,
    memory_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    sample_of_row: torch.Tensor,
    slots_of_sample: torch.Tensor,
    beta_prime: float,
    weighting: Weighting = "difficulty",
    detach_weight: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The MemLoss term for a batch whose filled memory slots are given row by row.

    Args:
        clean_logits: ``(B, C)`` clean logits of the whole batch, with their graph.
        memory_logits: ``(R, C)`` logits on the ``R`` memory examples read for this batch.
        targets: ``(B,)`` integer labels of the batch.
        sample_of_row: ``(R,)`` batch position of each memory row.
        slots_of_sample: ``(B,)`` number of filled slots of each sample (``K_i``).
        beta_prime: the term's weight ``beta'``.
        weighting: ``"difficulty"`` or ``"none"``.
        detach_weight: stop the gradient through the weight.

    Returns:
        ``(term, weight)``: the 0-dim fp32 term and the ``(R,)`` row weights (detached).

    Example:
        >>> clean = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> memory = torch.tensor([[0.0, 0.0]])
        >>> term, _ = memloss_term(
        ...     clean, memory, torch.tensor([0, 1]), sample_of_row=torch.tensor([0]),
        ...     slots_of_sample=torch.tensor([1, 0]), beta_prime=2.0)
        >>> round(float(term), 4)  # 2 * (1/2) * 0.5 * KL([.731, .269] || [.5, .5])
        0.0555
    """
    batch_size = clean_logits.shape[0]
    if _one_row_per_sample(sample_of_row, slots_of_sample, batch_size):
        # One row per sample, in batch order (depth 1, every sample filled): no gathers.
        kl, weight = memory_kl_rows(
            clean_logits,
            memory_logits,
            targets.to(clean_logits.device),
            weighting=weighting,
            detach_weight=detach_weight,
        )
        return (weight * kl).sum() * (beta_prime / batch_size), weight.detach()
    # Host indices reach the GPU without a blocking copy (see store.transfer).
    rows = transfer.to_device(sample_of_row, clean_logits.device)
    target_rows = rows if targets.device == rows.device else sample_of_row.to(targets.device)
    kl, weight = memory_kl_rows(
        clean_logits.index_select(0, rows),
        memory_logits,
        targets.index_select(0, target_rows).to(clean_logits.device),
        weighting=weighting,
        detach_weight=detach_weight,
    )
    per_row_share = transfer.to_device(slots_of_sample, kl.device).index_select(0, rows)
    per_row_share = per_row_share.to(kl.dtype)
    term = (weight * kl / per_row_share).sum() * (beta_prime / batch_size)
    return term, weight.detach()


def _one_row_per_sample(
    sample_of_row: torch.Tensor, slots_of_sample: torch.Tensor, batch_size: int
) -> bool:
    """Whether row ``r`` is sample ``r``'s only row (checked on the host, where they are)."""
    if sample_of_row.shape[0] != batch_size or sample_of_row.device.type != "cpu":
        return False
    if slots_of_sample.device.type != "cpu":
        return False
    return bool((slots_of_sample.numpy() == 1).all()) and bool(
        (sample_of_row.numpy() == np.arange(batch_size)).all()
    )
