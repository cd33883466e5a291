"""Shared pieces of the base objectives: the result type, argument checks and the clean loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..checks import finite_number, positive_int
from ..loss import log_probs, no_autocast

__all__ = ["ObjectiveOutput", "check_attack_args", "check_inputs", "cross_entropy"]


@dataclass(frozen=True, slots=True)
class ObjectiveOutput:
    """What every base objective returns.

    Attributes:
        loss: the method's training loss, a 0-dim tensor with its graph.
        adv: the adversarial examples the method trained on, detached, inside the eps-ball around
            the clean inputs and inside ``[0, 1]``.
        logits: the clean logits with their graph, from the forward pass the loss uses (or, for
            methods whose loss has no clean term, from one extra clean forward pass).
        adv_logits: the logits on ``adv`` from the forward pass the loss uses, with their graph
            (pass them to the memory as ``adv_logits=`` for its diagnostics).

    Example:
        >>> out = ObjectiveOutput(
        ...     torch.tensor(1.0), torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 4))
        >>> out.loss.item(), tuple(out.adv.shape), tuple(out.logits.shape)
        (1.0, (2, 3), (2, 4))
    """

    loss: torch.Tensor
    adv: torch.Tensor
    logits: torch.Tensor
    adv_logits: torch.Tensor


def check_attack_args(*, eps: float, step_size: float, steps: int) -> None:
    """Check the L-inf attack settings shared by all objectives.

    Raises:
        TypeError: ``eps`` or ``step_size`` is not a real number, or ``steps`` not an ``int``.
        ValueError: ``eps`` is not finite and ``>= 0``, ``step_size`` not finite and ``> 0``, or
            ``steps < 1``.

    Example:
        >>> check_attack_args(eps=8 / 255, step_size=2 / 255, steps=10)
    """
    finite_number("eps", eps)
    finite_number("step_size", step_size, positive=True)
    positive_int("steps", steps)


def check_inputs(x: torch.Tensor, y: torch.Tensor) -> None:
    """Check a batch: floating inputs in ``[0, 1]`` and one integer label per input.

    The range check reads two numbers back from the device: inputs normalized outside ``[0, 1]``
    would make the eps-ball and the ``[0, 1]`` box disagree, so they are refused here (put the
    normalization inside the model instead).

    Example:
        >>> check_inputs(torch.rand(2, 3), torch.tensor([0, 1]))
    """
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"x and y must be tensors, got {type(x).__name__} and {type(y).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"y must be an integer tensor of class labels, got dtype {y.dtype}")
    if x.dim() < 2 or y.dim() != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(
            "x must be (B, ...) and y must be (B,) with B >= 1, got shapes "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    bounds = torch.aminmax(x.detach())
    low, high = float(bounds.min), float(bounds.max)
    if not (low >= 0.0 and high <= 1.0):
        raise ValueError(
            f"x must lie in [0, 1] (put input normalization inside the model), got values in "
            f"[{low}, {high}]"
        )


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Batch-mean cross-entropy from logits upcast to at least fp32, with autocast off.

    Example:
        >>> round(cross_entropy(torch.tensor([[0.0, 0.0]]), torch.tensor([1])).item(), 4)
        0.6931
    """
    with no_autocast(logits.device):
        return F.nll_loss(log_probs(logits), y.long())
