"""TRADES (Zhang et al., ICML 2019): clean cross-entropy plus a KL robustness term."""

from __future__ import annotations

import torch
from torch import nn

from ..checks import finite_number
from ..loss import kl_rows, log_probs
from ..model_state import eval_mode
from ._common import ObjectiveOutput, check_attack_args, check_inputs, cross_entropy
from .pgd import kl_attack

__all__ = ["trades"]


def trades(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    beta: float,
    init: torch.Tensor | None = None,
) -> ObjectiveOutput:
    """The TRADES loss ``CE(f(x), y) + beta * (1/B) sum_i KL(p(x_i) || p(x'_i))``.

    Paper: https://arxiv.org/abs/1901.08573; reference code: ``yaodongyu/TRADES``, ``trades.py``.

    Attack: ``steps`` sign-gradient steps ascending ``sum_i KL(p(x_i) || p(x'_i))`` from
    ``x + 0.001 * N(0, I)`` (the start is not clipped; every step projects onto the eps-ball and
    ``[0, 1]``), with the model and all submodules in eval mode and ``p(x)`` fixed. Loss: the clean
    and adversarial forward passes run in the modes the caller set (train mode in training). The KL
    target ``p(x)`` is not detached, so gradient flows through both predictions.

    Differences from the reference code:

    - the KL sum is divided by ``len(x)`` as in the reference, without its deprecated
      ``size_average`` argument;
    - the KL comes from ``log_softmax`` on both sides (``log_target=True``) computed in at least
      fp32, rather than from ``softmax`` probabilities as the target;
    - the clean forward pass runs once and feeds both terms; the reference runs it twice, which
      gives the same outputs for deterministic layers but updates BatchNorm running statistics
      twice with the same batch;
    - every module's train/eval flag is restored as found instead of calling ``model.train()``.

    Random numbers: one ``torch.randn_like(x)`` from the global RNG of ``x``'s device.

    Args:
        model: the classifier, taking inputs in ``[0, 1]``.
        x: clean inputs, ``(B, ...)`` in ``[0, 1]``.
        y: integer labels, ``(B,)``.
        eps: L-inf radius (required; the reference trains CIFAR-10 with 0.031).
        step_size: attack step (required; the reference trains with 0.007, its function default is
            0.003).
        steps: attack steps (required; the reference trains with 10).
        beta: weight of the KL term (required; the reference trains with 6.0, its function default
            is 1.0, its README suggests 1 to 10).
        init: where the attack starts instead of its usual start, e.g. last epoch's example from
            :meth:`memloss_addon.MemoryWrapper.recall`; projected into the eps-ball and ``[0, 1]``,
            and no random number is drawn for the start. ``steps`` may then be as low as 1.

    Returns:
        ``ObjectiveOutput(loss, adv, logits, adv_logits)``: ``logits`` are the clean logits the
        loss uses.

    Raises:
        ValueError: a bad ``eps``, ``step_size``, ``steps`` or ``beta``, or ``x`` outside
            ``[0, 1]``.
        TypeError: a setting that is not a number (``steps`` not an ``int``), or ``x`` or ``y``
            of the wrong kind.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(4, 3)
        >>> x, y = torch.rand(8, 4), torch.randint(0, 3, (8,))
        >>> out = trades(model, x, y, eps=8 / 255, step_size=2 / 255, steps=3, beta=6.0)
        >>> out.loss.shape, bool((out.adv - x).abs().max() <= 8 / 255 + 1e-6)
        (torch.Size([]), True)
        >>> out.loss.backward()
    """
    check_attack_args(eps=eps, step_size=step_size, steps=steps)
    beta = finite_number("beta", beta)
    check_inputs(x, y)
    with eval_mode(model):
        adv = kl_attack(model, x, eps=eps, step_size=step_size, steps=steps, init=init)
    logits = model(x)
    adv_logits = model(adv)
    robust = kl_rows(log_probs(logits), log_probs(adv_logits)).sum() / len(x)
    loss = cross_entropy(logits, y) + beta * robust
    return ObjectiveOutput(loss=loss, adv=adv, logits=logits, adv_logits=adv_logits)
