"""PGD adversarial training (Madry et al., ICLR 2018): cross-entropy on PGD examples."""

from __future__ import annotations

import torch
from torch import nn

from ..model_state import eval_mode, frozen_running_stats
from ._common import ObjectiveOutput, check_attack_args, check_inputs, cross_entropy
from .pgd import attack_start, ce_attack, uniform_start

__all__ = ["pgd_at"]


def pgd_at(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    init: torch.Tensor | None = None,
) -> ObjectiveOutput:
    """The PGD-AT loss ``CE(f(x'), y)``, batch mean, with ``x'`` from PGD on the cross-entropy.

    Paper: https://arxiv.org/abs/1706.06083; reference configuration: ``MadryLab/cifar10_challenge``
    (eps 8/255, 10 steps of 2/255, random start).

    Attack: start uniformly in the eps-ball, ``x + U(-eps, eps)`` clipped to ``[0, 1]``, then
    ``steps`` sign-gradient steps ascending the cross-entropy, each projected onto the eps-ball and
    ``[0, 1]``, with the model and all submodules in eval mode (as PyTorch ports of the method, e.g.
    ``imrahulr/hat``'s ``adversarial_loss``, do). The loss forward pass on ``x'`` runs in the modes
    the caller set (train mode in training).

    The loss has no clean term, so ``logits`` come from one extra forward pass on ``x`` in the
    caller's modes with BatchNorm running statistics frozen (batch statistics are used in train
    mode, but running statistics and ``num_batches_tracked`` are left as plain PGD-AT leaves them).

    Random numbers: one ``torch.rand_like(x)`` ``u`` from the global RNG of ``x``'s device; the
    start is ``x + eps * (2u - 1)``.

    Args:
        model: the classifier, taking inputs in ``[0, 1]``.
        x: clean inputs, ``(B, ...)`` in ``[0, 1]``.
        y: integer labels, ``(B,)``.
        eps: L-inf radius (required; the reference uses 8/255).
        step_size: attack step (required; the reference uses 2/255).
        steps: attack steps (required; the reference uses 10).
        init: where the attack starts instead of its usual start, e.g. last epoch's example from
            :meth:`memloss_addon.MemoryWrapper.recall`; projected into the eps-ball and ``[0, 1]``,
            and no random number is drawn for the start. ``steps`` may then be as low as 1.

    Returns:
        ``ObjectiveOutput(loss, adv, logits, adv_logits)``.

    Raises:
        ValueError: a bad ``eps``, ``step_size`` or ``steps``, or ``x`` outside ``[0, 1]``.
        TypeError: a setting that is not a number (``steps`` not an ``int``), or ``x`` or ``y``
            of the wrong kind.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(4, 3)
        >>> x, y = torch.rand(8, 4), torch.randint(0, 3, (8,))
        >>> out = pgd_at(model, x, y, eps=8 / 255, step_size=2 / 255, steps=3)
        >>> bool(out.adv.min() >= 0 and out.adv.max() <= 1), out.logits.shape
        (True, torch.Size([8, 3]))
    """
    check_attack_args(eps=eps, step_size=step_size, steps=steps)
    check_inputs(x, y)
    x_clean = x.detach()
    start = attack_start(x_clean, init, eps=eps, default=lambda: uniform_start(x_clean, eps))
    with eval_mode(model):
        adv = ce_attack(model, x_clean, y, start, eps=eps, step_size=step_size, steps=steps)
    adv_logits = model(adv)
    loss = cross_entropy(adv_logits, y)
    with frozen_running_stats(model):
        logits = model(x)
    return ObjectiveOutput(loss=loss, adv=adv, logits=logits, adv_logits=adv_logits)
