"""Single-step adversarial training: FGSM with a random start and a gradient-masking regularizer."""

from __future__ import annotations

import torch
from torch import nn

from ..checks import finite_number
from ..loss import no_autocast, upcast
from ..model_state import frozen_running_stats
from ._common import ObjectiveOutput, check_attack_args, check_inputs, cross_entropy
from .pgd import attack_start, ce_attack, uniform_start

__all__ = ["single_step"]


def single_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int = 1,
    reg_weight: float,
    init: torch.Tensor | None = None,
) -> ObjectiveOutput:
    """FGSM training with a random start, plus a regularizer against gradient masking.

    ``L = CE(f(x'), y) + reg_weight * (1/B) sum_i ||f(x_fgsm_i) - f(x'_i)||_2^2``

    - ``x'`` is the FGSM adversary with a random start of Wong et al., "Fast is better than free"
      (https://arxiv.org/abs/2001.03994): ``x0 = x + U(-eps, eps)`` clipped to ``[0, 1]``, then one
      step ``x' = proj(x0 + step_size * sign(grad CE))`` onto the eps-ball and ``[0, 1]``. Their
      CIFAR-10 setting is eps 8/255 with step 10/255.
    - ``x_fgsm = proj(x + eps * sign(grad_x CE(f(x), y)))`` is plain FGSM from the clean input.
    - The regularizer is **inspired by** Vivek B.S. and Babu ("Regularizer to mitigate gradient
      masking effect during single-step adversarial training", CVPRW 2019, and "Regularizers for
      single-step adversarial training", https://arxiv.org/abs/2002.00614), who penalise the
      distance between the logits of the FGSM and the randomised-FGSM adversaries of a sample. Their
      exact distance, weight and adversaries are not public; this is not a reproduction. Here the
      distance is the squared L2 norm, the randomised adversary is ``x'`` itself (no extra attack),
      gradient flows through both logits, and the weight has no published default.

    Both gradient computations run in the modes the caller set (train mode in training, as in Wong
    et al.) with BatchNorm running statistics frozen, so only the loss forward passes on ``x'`` and
    ``x_fgsm`` update them. ``logits`` come from one extra forward pass on ``x`` in the caller's
    modes with running statistics frozen. With ``reg_weight=0`` no ``x_fgsm`` is made and the loss
    is plain FGSM-RS training.

    Random numbers: one ``torch.rand_like(x)`` ``u`` from the global RNG of ``x``'s device; the
    start is ``x + eps * (2u - 1)``.

    Args:
        model: the classifier, taking inputs in ``[0, 1]``.
        x: clean inputs, ``(B, ...)`` in ``[0, 1]``.
        y: integer labels, ``(B,)``.
        eps: L-inf radius (required).
        step_size: step from the random start (required; Wong et al. use ``1.25 * eps``).
        steps: must be 1; accepted so that every objective takes the same attack arguments.
        init: where the attack starts instead of its usual start, e.g. last epoch's example from
            :meth:`memloss_addon.MemoryWrapper.recall`; projected into the eps-ball and ``[0, 1]``,
            and no random number is drawn for the start. ``steps`` may then be as low as 1.
        reg_weight: weight of the regularizer (required; ``0`` gives plain FGSM-RS).

    Returns:
        ``ObjectiveOutput(loss, adv, logits, adv_logits)``: ``adv`` is ``x'``.

    Raises:
        ValueError: a bad ``eps``, ``step_size`` or ``reg_weight``, ``steps != 1``, or ``x``
            outside ``[0, 1]``.
        TypeError: a setting that is not a number (``steps`` not an ``int``), or ``x`` or ``y``
            of the wrong kind.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(4, 3)
        >>> x, y = torch.rand(8, 4), torch.randint(0, 3, (8,))
        >>> out = single_step(model, x, y, eps=8 / 255, step_size=10 / 255, reg_weight=0.1)
        >>> bool((out.adv - x).abs().max() <= 8 / 255 + 1e-6), out.loss.requires_grad
        (True, True)
    """
    check_attack_args(eps=eps, step_size=step_size, steps=steps)
    if steps != 1:
        raise ValueError(f"single_step takes exactly one step, got steps={steps!r}")
    reg_weight = finite_number("reg_weight", reg_weight)
    check_inputs(x, y)
    x_clean = x.detach()
    start = attack_start(x_clean, init, eps=eps, default=lambda: uniform_start(x_clean, eps))
    with frozen_running_stats(model):
        adv = ce_attack(model, x_clean, y, start, eps=eps, step_size=step_size, steps=1)
        if reg_weight > 0:
            fgsm = ce_attack(model, x_clean, y, x_clean, eps=eps, step_size=eps, steps=1)

    adv_logits = model(adv)
    loss = cross_entropy(adv_logits, y)
    if reg_weight > 0:
        fgsm_logits = model(fgsm)
        with no_autocast(adv_logits.device):
            gap = upcast(fgsm_logits) - upcast(adv_logits)
            loss = loss + reg_weight * gap.pow(2).sum(dim=1).mean()
    with frozen_running_stats(model):
        logits = model(x)
    return ObjectiveOutput(loss=loss, adv=adv, logits=logits, adv_logits=adv_logits)
