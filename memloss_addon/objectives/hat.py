"""HAT (Rade and Moosavi-Dezfooli, ICLR 2022): TRADES plus a loss on helper examples."""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import nn

from ..checks import finite_number
from ..loss import kl_rows, log_probs
from ..model_state import eval_mode
from ._common import ObjectiveOutput, check_attack_args, check_inputs, cross_entropy
from .pgd import kl_attack

__all__ = ["hat"]


def hat(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    beta: float,
    helper: nn.Module,
    h: float = 2.0,
    gamma: float = 1.0,
    init: torch.Tensor | None = None,
) -> ObjectiveOutput:
    """Helper-based adversarial training on top of TRADES.

    ``L = CE(f(x), y) + beta * (1/B) sum_i KL(p(x_i) || p(x'_i)) + gamma * CE(f(x_hr), y_hr)``
    with ``x_hr = x + h (x' - x)`` (not clipped or projected: helper examples lie outside the
    eps-ball on purpose) and ``y_hr = argmax f_std(x')``, where ``f_std`` is ``helper``, a frozen,
    standard-trained model that sees ``x'``, not ``x_hr``.

    Paper: https://openreview.net/forum?id=Azh9QBQ4tR7; reference code: ``imrahulr/hat``,
    ``core/utils/hat.py`` (``hat_loss``) and the argument defaults of ``core/utils/parser.py``.

    Attack: the TRADES attack, as in :func:`~memloss_addon.objectives.trades` (start
    ``x + 0.001 * N(0, I)``, model in eval mode). The helper runs in eval mode (all submodules)
    under ``torch.no_grad()``, so it gets no parameter gradients; its flags are restored as found.
    The clean, adversarial and helper-example forward passes of the loss run in the modes the
    caller set. As in :func:`trades`, KL terms come from ``log_softmax`` in at least fp32 and the
    model's flags are restored as found instead of calling ``model.train()``.

    Random numbers: one ``torch.randn_like(x)`` from the global RNG of ``x``'s device.

    Args:
        model: the classifier being trained, taking inputs in ``[0, 1]``.
        x: clean inputs, ``(B, ...)`` in ``[0, 1]``.
        y: integer labels, ``(B,)``.
        eps: L-inf radius (required; the reference uses 8/255).
        step_size: attack step (required; the reference uses 2/255).
        steps: attack steps (required; the reference uses 10).
        init: where the attack starts instead of its usual start, e.g. last epoch's example from
            :meth:`memloss_addon.MemoryWrapper.recall`; projected into the eps-ball and ``[0, 1]``,
            and no random number is drawn for the start. ``steps`` may then be as low as 1.
        beta: weight of the KL term (required: the reference has no default; its README's
            ResNet-18 CIFAR-10 recipe uses 2.5).
        helper: the frozen standard-trained model that labels the helper examples.
        h: helper-example scale (default 2.0, the reference's command-line default; its
            function default 3.5 is overridden there).
        gamma: weight of the helper loss (default 1.0, the reference's command-line default;
            its README recipe uses 0.5).

    Returns:
        ``ObjectiveOutput(loss, adv, logits, adv_logits)``: ``adv`` is ``x'`` (not ``x_hr``),
        ``logits`` the clean logits the loss uses.

    Raises:
        ValueError: a bad ``eps``, ``step_size``, ``steps``, ``beta``, ``gamma`` or ``h``, or ``x``
            outside ``[0, 1]``.
        TypeError: ``helper`` is not a module, a setting is not a number, or ``x`` or ``y`` of
            the wrong kind.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model, helper = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
        >>> x, y = torch.rand(8, 4), torch.randint(0, 3, (8,))
        >>> out = hat(model, x, y, eps=8 / 255, step_size=2 / 255, steps=3, beta=2.5,
        ...           helper=helper, gamma=0.5)
        >>> out.loss.backward()
        >>> helper.weight.grad is None and model.weight.grad is not None
        True
    """
    check_attack_args(eps=eps, step_size=step_size, steps=steps)
    beta = finite_number("beta", beta)
    gamma = finite_number("gamma", gamma)
    if isinstance(h, bool) or not isinstance(h, Real):
        raise TypeError(f"h must be a real number, got {h!r}")
    if not math.isfinite(h):
        raise ValueError(f"h must be a finite number, got {h!r}")
    if not isinstance(helper, nn.Module):
        raise TypeError(f"helper must be a torch.nn.Module, got {type(helper).__name__}")
    check_inputs(x, y)
    with eval_mode(model):
        adv = kl_attack(model, x, eps=eps, step_size=step_size, steps=steps, init=init)
    with eval_mode(helper), torch.no_grad():
        helper_labels = helper(adv).argmax(dim=1)
    x_clean = x.detach()
    helper_x = x_clean + h * (adv - x_clean)

    logits = model(x)
    adv_logits = model(adv)
    helper_logits = model(helper_x)
    robust = kl_rows(log_probs(logits), log_probs(adv_logits)).sum() / len(x)
    loss = (
        cross_entropy(logits, y)
        + beta * robust
        + gamma * cross_entropy(helper_logits, helper_labels)
    )
    return ObjectiveOutput(loss=loss, adv=adv, logits=logits, adv_logits=adv_logits)
