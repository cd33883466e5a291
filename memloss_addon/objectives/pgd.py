"""The one L-inf sign-gradient (PGD) loop of the package, and the attacks built on it.

The base objectives and the evaluation's PGD all run :func:`sign_ascent`. It takes the model in
whatever mode the caller has set (the objectives choose it) and takes gradients with
``torch.autograd.grad`` with respect to the input only, so no ``.grad`` is left on the model's
parameters.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..loss import kl_rows, log_probs

__all__ = [
    "attack_start",
    "ce_attack",
    "kl_attack",
    "project_linf",
    "sign_ascent",
    "uniform_start",
]


def project_linf(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Project onto ``{x' : |x' - x|_inf <= eps}``, then clip to ``[0, 1]``.

    Example:
        >>> project_linf(torch.tensor([0.5, 0.9, 0.0]), torch.tensor([0.2, 0.95, 0.05]), 0.1)
        tensor([0.3000, 0.9000, 0.0000])
    """
    return torch.clamp(torch.clamp(x_adv, x - eps, x + eps), 0.0, 1.0)


def uniform_start(x: torch.Tensor, eps: float) -> torch.Tensor:
    """A uniform random point of the eps-ball around ``x``, clipped to ``[0, 1]``.

    Draws one ``torch.rand_like(x)`` ``u`` from the global RNG of ``x``'s device; the point is
    ``x + eps (2u - 1)``.

    Example:
        >>> x = torch.full((2, 3), 0.5)
        >>> bool(((uniform_start(x, 0.1) - x).abs() <= 0.1).all())
        True
    """
    return project_linf(x + eps * (2.0 * torch.rand_like(x) - 1.0), x, eps)


def attack_start(
    x: torch.Tensor,
    init: torch.Tensor | None,
    *,
    eps: float,
    default: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """The first point of an attack: ``init`` projected into the eps-ball of ``x`` and ``[0, 1]``,
    or, without ``init``, ``default()`` (the method's usual, possibly random, start).

    With ``init`` no random number is drawn. A start from memory (see
    :meth:`memloss_addon.MemoryWrapper.recall`) lets an attack accumulate strength across epochs
    with few steps per epoch, as ATTA does (Zheng et al., CVPR 2020, arXiv 1912.11969).

    Raises:
        TypeError: ``init`` is not a floating-point tensor.
        ValueError: ``init`` has another shape or device than ``x``.

    Example:
        >>> x = torch.full((1, 2), 0.5)
        >>> attack_start(x, torch.tensor([[0.9, 0.45]]), eps=0.1, default=lambda: x)
        tensor([[0.6000, 0.4500]])
    """
    if init is None:
        return default()
    if not isinstance(init, torch.Tensor) or not init.is_floating_point():
        raise TypeError(f"init must be a floating-point tensor, got {type(init).__name__}")
    if init.shape != x.shape or init.device != x.device:
        raise ValueError(
            f"init must have the shape and device of x, {tuple(x.shape)} on {x.device}; got "
            f"{tuple(init.shape)} on {init.device}"
        )
    return project_linf(init.detach().to(x.dtype), x.detach(), eps)


def sign_ascent(
    model: nn.Module,
    x: torch.Tensor,
    start: torch.Tensor,
    attack_loss: Callable[[torch.Tensor], torch.Tensor],
    *,
    eps: float,
    step_size: float,
    steps: int,
) -> torch.Tensor:
    """``steps`` times ``x' <- proj(x' + step_size * sign(grad attack_loss(model(x'))))``.

    Args:
        model: the network; its modes are the caller's business.
        x: clean inputs (the centre of the eps-ball).
        start: the first point, which need not lie in the ball (it is projected after a step).
        attack_loss: maps the logits on ``x'`` to a 0-dim loss to ascend.
        eps: L-inf radius.
        step_size: step length.
        steps: number of steps (>= 1).

    Returns:
        The detached adversarial examples.

    Example:
        >>> net = torch.nn.Linear(2, 2)
        >>> x = torch.full((1, 2), 0.5)
        >>> adv = sign_ascent(net, x, x, lambda z: z[:, 0].sum(), eps=0.1, step_size=0.3, steps=1)
        >>> bool(((adv - x).abs() <= 0.1 + 1e-7).all())
        True
    """
    x = x.detach()
    x_adv = start.detach()
    with torch.enable_grad():
        for _ in range(steps):
            x_adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(attack_loss(model(x_adv)), (x_adv,))
            x_adv = project_linf(x_adv.detach() + step_size * grad.sign(), x, eps)
    return x_adv.detach()


def ce_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    start: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
) -> torch.Tensor:
    """PGD ascending the cross-entropy from ``start``.

    The cross-entropy is summed over the batch: the sign ignores the scale, and a sum does not
    shrink small gradients towards underflow as a mean would in half precision.

    Example:
        >>> net = torch.nn.Linear(2, 2)
        >>> x, y = torch.full((1, 2), 0.5), torch.tensor([0])
        >>> ce_attack(net, x, y, x, eps=0.1, step_size=0.1, steps=2).shape
        torch.Size([1, 2])
    """
    labels = y.long().view(-1, 1)
    return sign_ascent(
        model,
        x,
        start,
        lambda z: -log_probs(z).gather(1, labels).sum(),
        eps=eps,
        step_size=step_size,
        steps=steps,
    )


def kl_attack(
    model: nn.Module,
    x: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    init: torch.Tensor | None = None,
) -> torch.Tensor:
    """The TRADES attack: PGD ascending ``sum_i KL(p(x_i) || p(x'_i))`` from ``x + 0.001 N(0, I)``.

    ``p(x)`` is computed once, without graph, in the model's current mode. Draws one
    ``torch.randn_like(x)`` from the global RNG of ``x``'s device, unless ``init`` is given: the
    attack then starts from it (see :func:`attack_start`) and draws nothing.

    Example:
        >>> net = torch.nn.Linear(2, 2)
        >>> kl_attack(net, torch.full((1, 2), 0.5), eps=0.1, step_size=0.05, steps=2).shape
        torch.Size([1, 2])
    """
    x = x.detach()
    start = attack_start(x, init, eps=eps, default=lambda: x + 0.001 * torch.randn_like(x))
    with torch.no_grad():
        clean_log_p = log_probs(model(x))
    return sign_ascent(
        model,
        x,
        start,
        lambda z: kl_rows(clean_log_p, log_probs(z)).sum(),
        eps=eps,
        step_size=step_size,
        steps=steps,
    )
