"""Squeeze Training (Li et al., ICLR 2023): adversarial and collaborative examples made jointly."""

from __future__ import annotations

import torch
from torch import nn

from ..checks import finite_number
from ..loss import kl_rows, log_probs
from ..model_state import frozen_running_stats
from ._common import ObjectiveOutput, check_attack_args, check_inputs, cross_entropy
from .pgd import attack_start, project_linf

__all__ = ["squeeze"]

# Candidate order used by the selection: 0 = clean input, 1 = collaborative, 2 = adversarial.
_CLEAN = 0


def _select_upper_lower(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, the candidate with the smallest ("upper") and largest ("lower") ``p_y``.

    ``logits`` is ``(3, B, C)``: clean, collaborative, adversarial.
    """
    with torch.no_grad():
        candidates, batch, classes = logits.shape
        log_p = log_probs(logits.reshape(candidates * batch, classes)).view(logits.shape)
        index = y.long().view(1, -1, 1).expand(candidates, -1, 1)
        log_p_true = log_p.gather(2, index).squeeze(2)
        return log_p_true.argmin(dim=0), log_p_true.argmax(dim=0)


def _pick(stacked: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """Row ``i`` of candidate ``which[i]`` from a ``(3, B, ...)`` stack (keeps the graph)."""
    return stacked[which, torch.arange(stacked.shape[1], device=stacked.device)]


def _symmetric_kl(upper_logits: torch.Tensor, lower_logits: torch.Tensor) -> torch.Tensor:
    """``(1/B) sum_i 1/2 [KL(sg p_lower || p_upper) + KL(sg p_upper || p_lower)]``."""
    log_upper, log_lower = log_probs(upper_logits), log_probs(lower_logits)
    rows = kl_rows(log_lower.detach(), log_upper) + kl_rows(log_upper.detach(), log_lower)
    return 0.5 * rows.sum() / len(rows)


def squeeze(
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
    """The Squeeze Training loss ``CE(f(x), y) + beta * SKL(upper, lower)``.

    Paper: https://openreview.net/forum?id=Z_tmYu060Kr ("Squeeze Training for Adversarial
    Robustness"); reference code: ``qizhangli/ST-AT``, ``losses.py`` (``stat_loss``).

    ``SKL(u, l) = (1/B) sum_i 1/2 [KL(sg p(l_i) || p(u_i)) + KL(sg p(u_i) || p(l_i))]`` where, per
    sample, "upper" is whichever of the clean input, the collaborative example ``x_col`` and the
    adversarial example ``x_adv`` has the smallest ``p_y`` and "lower" the one with the largest.

    Joint generation: ``x_adv`` and ``x_col`` both start at ``x + 0.001 * N(0, I)`` (not clipped).
    Each step re-selects upper and lower, ascends SKL, and sets
    ``x_adv = proj(upper + step_size * sign(grad_upper))`` and
    ``x_col = proj(lower + step_size * sign(grad_lower))`` (so a candidate restarts from ``x`` when
    the clean input was selected). The attack runs in the modes the caller set (train mode in
    training, as in the reference) with BatchNorm running statistics frozen, so batch statistics
    are used and nothing is updated. The loss re-selects upper and lower among the final three
    points; its forward pass on ``x_col`` keeps running statistics frozen and those on ``x`` and
    ``x_adv`` run normally, as in the reference.

    Difference from the reference code: when no sample selects the clean input, the reference
    re-assigns the gradients to upper and lower but not the positions, so a sample whose upper
    point is ``x_col`` takes ``x_col``'s gradient step from ``x_adv``'s position (and the other way
    round). Here a point and its gradient always move together. Also, KL terms come from
    ``log_softmax`` in at least fp32, every BatchNorm variant (not only ``BatchNorm2d``) is frozen,
    and all flags are restored as found.

    Random numbers: two ``torch.randn_like(x)`` from the global RNG of ``x``'s device, the first
    for ``x_adv`` and the second for ``x_col``.

    Args:
        model: the classifier, taking inputs in ``[0, 1]``.
        x: clean inputs, ``(B, ...)`` in ``[0, 1]``.
        y: integer labels, ``(B,)``.
        eps: L-inf radius (required; the reference uses 8/255).
        step_size: attack step (required; the reference uses 2/255, and 1/255 on SVHN).
        steps: attack steps (required; the reference uses 10).
        init: where the attack starts instead of its usual start, e.g. last epoch's example from
            :meth:`memloss_addon.MemoryWrapper.recall`; projected into the eps-ball and ``[0, 1]``,
            and no random number is drawn for the start. ``steps`` may then be as low as 1.
        beta: weight of the SKL term (required: the reference has no default; its RST script uses
            6.0).

    Returns:
        ``ObjectiveOutput(loss, adv, logits, adv_logits)``: ``adv`` is ``x_adv``, ``logits`` the
        clean logits the loss uses.

    Raises:
        ValueError: a bad ``eps``, ``step_size``, ``steps`` or ``beta``, or ``x`` outside
            ``[0, 1]``.
        TypeError: a setting that is not a number (``steps`` not an ``int``), or ``x`` or ``y``
            of the wrong kind.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(4, 3)
        >>> x, y = torch.rand(8, 4), torch.randint(0, 3, (8,))
        >>> out = squeeze(model, x, y, eps=8 / 255, step_size=2 / 255, steps=3, beta=6.0)
        >>> out.loss.shape, bool((out.adv - x).abs().max() <= 8 / 255 + 1e-6)
        (torch.Size([]), True)
    """
    check_attack_args(eps=eps, step_size=step_size, steps=steps)
    beta = finite_number("beta", beta)
    check_inputs(x, y)
    x_clean = x.detach()
    if init is None:
        x_adv = x_clean + 0.001 * torch.randn_like(x_clean)
        x_col = x_clean + 0.001 * torch.randn_like(x_clean)
    else:  # the collaborative example starts at x: the memory holds adversarial examples only
        x_adv = attack_start(x_clean, init, eps=eps, default=lambda: x_clean)
        x_col = x_clean.clone()

    with frozen_running_stats(model), torch.enable_grad():
        with torch.no_grad():
            clean_logits = model(x_clean)
        for _ in range(steps):
            x_col = x_col.detach().requires_grad_(True)
            x_adv = x_adv.detach().requires_grad_(True)
            col_logits, adv_logits = model(x_col), model(x_adv)
            upper, lower = _select_upper_lower(
                torch.stack([clean_logits, col_logits, adv_logits]), y
            )
            inputs = [x_col, x_adv]
            step_clean_logits = clean_logits
            # A gradient at the clean input is needed only where it was selected (one host sync,
            # as in the reference).
            if bool(((upper == _CLEAN) | (lower == _CLEAN)).any()):
                clean_var = x_clean.clone().requires_grad_(True)
                step_clean_logits = model(clean_var)
                inputs.insert(0, clean_var)
            stacked = torch.stack([step_clean_logits, col_logits, adv_logits])
            attack_loss = _symmetric_kl(_pick(stacked, upper), _pick(stacked, lower))
            grads = torch.autograd.grad(
                attack_loss, inputs, allow_unused=True, materialize_grads=True
            )
            grad_clean = grads[0] if len(grads) == 3 else torch.zeros_like(x_clean)
            points = torch.stack([x_clean, x_col.detach(), x_adv.detach()])
            signs = torch.stack([grad_clean, grads[-2], grads[-1]]).sign()
            x_adv = _pick(points, upper) + step_size * _pick(signs, upper)
            x_col = _pick(points, lower) + step_size * _pick(signs, lower)
            x_adv, x_col = project_linf(x_adv, x_clean, eps), project_linf(x_col, x_clean, eps)
    x_adv, x_col = x_adv.detach(), x_col.detach()

    with frozen_running_stats(model):
        col_logits = model(x_col)
    logits = model(x)
    adv_logits = model(x_adv)
    stacked = torch.stack([logits, col_logits, adv_logits])
    upper, lower = _select_upper_lower(stacked, y)
    loss = cross_entropy(logits, y) + beta * _symmetric_kl(
        _pick(stacked, upper), _pick(stacked, lower)
    )
    return ObjectiveOutput(loss=loss, adv=x_adv, logits=logits, adv_logits=adv_logits)
