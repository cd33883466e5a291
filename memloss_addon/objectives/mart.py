"""MART (Wang et al., ICLR 2020): boosted cross-entropy plus a misclassification-aware KL term."""

from __future__ import annotations

import torch
from torch import nn

from ..checks import finite_number
from ..loss import kl_rows, log_probs, no_autocast
from ..model_state import eval_mode
from ._common import ObjectiveOutput, check_attack_args, check_inputs, cross_entropy
from .pgd import attack_start, ce_attack

__all__ = ["mart"]

# The reference code's stabilisers, kept because they are part of its loss values.
_BCE_ONE = 1.0001
_BCE_TINY = 1e-12
_WEIGHT_ONE = 1.0000001


def mart(
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
    """The MART loss ``BCE(p(x'), y) + beta * (1/B) sum_i KL(p(x_i) || p(x'_i)) (1 - p_y(x_i))``.

    Paper: https://openreview.net/forum?id=rklOg6EFwS; reference code: ``YisenWang/MART``,
    ``mart.py``.

    Attack: ``steps`` sign-gradient steps ascending the cross-entropy from ``x + 0.001 * N(0, I)``
    (the start is not clipped; every step projects onto the eps-ball and ``[0, 1]``), with the model
    and all submodules in eval mode. Loss, with the clean and adversarial forward passes in the
    modes the caller set (train mode in training), as in the reference:

    - ``BCE(p, y) = CE(f(x'), y) - mean_i log(1.0001 - max_{k != y_i} p_k(x'_i) + 1e-12)``;
    - the KL target ``p(x)`` and the weight ``1.0000001 - p_y(x)`` are not detached.

    Differences from the reference code: the KL comes from ``log_softmax`` on both sides
    (``log_target=True``) in at least fp32, instead of ``log(softmax + 1e-12)``; the reference's
    ``argsort`` picks the strongest wrong class the same way except among exactly tied
    probabilities; every module's train/eval flag is restored as found instead of calling
    ``model.train()``.

    Random numbers: one ``torch.randn_like(x)`` from the global RNG of ``x``'s device.

    Args:
        model: the classifier, taking inputs in ``[0, 1]``.
        x: clean inputs, ``(B, ...)`` in ``[0, 1]``.
        y: integer labels, ``(B,)``.
        eps: L-inf radius (required; the reference uses 0.031).
        step_size: attack step (required; the reference uses 0.007).
        steps: attack steps (required; the reference uses 10).
        init: where the attack starts instead of its usual start, e.g. last epoch's example from
            :meth:`memloss_addon.MemoryWrapper.recall`; projected into the eps-ball and ``[0, 1]``,
            and no random number is drawn for the start. ``steps`` may then be as low as 1.
        beta: weight of the KL term (required; the reference uses 5.0 for ResNet-18 and 6.0 for
            WRN-34-10, which is also its function default).

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
        >>> out = mart(model, x, y, eps=8 / 255, step_size=2 / 255, steps=3, beta=6.0)
        >>> out.loss.shape, out.logits.requires_grad, out.adv.requires_grad
        (torch.Size([]), True, False)
    """
    check_attack_args(eps=eps, step_size=step_size, steps=steps)
    beta = finite_number("beta", beta)
    check_inputs(x, y)
    x_clean = x.detach()
    start = attack_start(
        x_clean, init, eps=eps, default=lambda: x_clean + 0.001 * torch.randn_like(x_clean)
    )
    with eval_mode(model):
        adv = ce_attack(model, x_clean, y, start, eps=eps, step_size=step_size, steps=steps)
    logits = model(x)
    adv_logits = model(adv)

    labels = y.long().view(-1, 1)
    log_p_clean = log_probs(logits)
    log_p_adv = log_probs(adv_logits)
    with no_autocast(logits.device):
        p_adv = log_p_adv.exp()
        # The strongest wrong class: the label's probability masked out of the argmax.
        wrong = p_adv.detach().scatter(1, labels, float("-inf")).argmax(dim=1, keepdim=True)
        margin = -torch.log(_BCE_ONE - p_adv.gather(1, wrong) + _BCE_TINY).mean()
        bce = cross_entropy(adv_logits, y) + margin
        weight = _WEIGHT_ONE - log_p_clean.exp().gather(1, labels).squeeze(1)
        robust = (kl_rows(log_p_clean, log_p_adv) * weight).sum() / len(x)
    loss = bce + beta * robust
    return ObjectiveOutput(loss=loss, adv=adv, logits=logits, adv_logits=adv_logits)
