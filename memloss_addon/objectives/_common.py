"""Shared pieces of the base objectives: the result type, checks, projection and mode guards.

The mode guards record every flag they touch and put it back in a ``finally`` block, so an attack
leaves the model exactly as it found it even when the forward pass raises.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from numbers import Real

import torch
import torch.nn.functional as F
from torch import nn

from ..loss import kl_rows, log_probs, no_autocast, upcast
from ..model_state import frozen_running_stats as frozen_batchnorm_stats
from ..model_state import preserved_training_flags as restored_modes

__all__ = [
    "ObjectiveOutput",
    "check_attack_args",
    "check_batch",
    "check_weight",
    "cross_entropy",
    "eval_mode",
    "frozen_batchnorm_stats",
    "kl_rows",
    "log_probs",
    "no_autocast",
    "project_linf",
    "restored_modes",
    "upcast",
]


@dataclass(frozen=True, slots=True)
class ObjectiveOutput:
    """What every base objective returns.

    Attributes:
        loss: the method's training loss, a 0-dim tensor with its graph.
        adv: the adversarial examples the method trained on, detached, inside the eps-ball around
            the clean inputs and inside ``[0, 1]``.
        logits: the clean logits with their graph, from the forward pass the loss uses (or, for
            methods whose loss has no clean term, from one extra clean forward pass).

    Example:
        >>> out = ObjectiveOutput(torch.tensor(1.0), torch.zeros(2, 3), torch.zeros(2, 4))
        >>> out.loss.item(), tuple(out.adv.shape), tuple(out.logits.shape)
        (1.0, (2, 3), (2, 4))
    """

    loss: torch.Tensor
    adv: torch.Tensor
    logits: torch.Tensor


def _is_real(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _check_number(name: str, value: object) -> None:
    if not _is_real(value):
        raise TypeError(f"{name} must be a real number, got {value!r}")


def check_weight(name: str, value: float) -> float:
    """Return ``value`` as a float after checking it is a finite number ``>= 0``.

    Raises:
        TypeError: ``value`` is not a real number (``bool`` included).
        ValueError: ``value`` is negative, infinite or NaN.

    Example:
        >>> check_weight("beta", 6)
        6.0
    """
    _check_number(name, value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_attack_args(*, eps: float, step_size: float, steps: int) -> None:
    """Check the L-inf attack settings shared by all objectives.

    Raises:
        TypeError: ``eps`` or ``step_size`` is not a real number, or ``steps`` not an ``int``.
        ValueError: ``eps`` is not finite and ``>= 0``, ``step_size`` not finite and ``> 0``, or
            ``steps < 1``.

    Example:
        >>> check_attack_args(eps=8 / 255, step_size=2 / 255, steps=10)
    """
    check_weight("eps", eps)
    _check_number("step_size", step_size)
    if not math.isfinite(step_size) or step_size <= 0:
        raise ValueError(f"step_size must be a finite number > 0, got {step_size!r}")
    if not isinstance(steps, int) or isinstance(steps, bool):
        raise TypeError(f"steps must be an int, got {steps!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps!r}")


def check_batch(x: torch.Tensor, y: torch.Tensor) -> None:
    """Check a batch: floating inputs in ``[0, 1]`` and one integer label per input.

    The range check reads two numbers back from the device: inputs normalized outside ``[0, 1]``
    would make the eps-ball and the ``[0, 1]`` box disagree, so they are refused here (put the
    normalization inside the model instead).

    Example:
        >>> check_batch(torch.rand(2, 3), torch.tensor([0, 1]))
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
    low, high = torch.aminmax(x.detach())
    low, high = float(low), float(high)
    if not (low >= 0.0 and high <= 1.0):
        raise ValueError(
            f"x must lie in [0, 1] (put input normalization inside the model), got values in "
            f"[{low}, {high}]"
        )


def project_linf(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Project onto ``{x' : |x' - x|_inf <= eps}``, then clip to ``[0, 1]``.

    Example:
        >>> project_linf(torch.tensor([0.5, 0.9, 0.0]), torch.tensor([0.2, 0.95, 0.05]), 0.1)
        tensor([0.3000, 0.9000, 0.0000])
    """
    return torch.clamp(torch.clamp(x_adv, x - eps, x + eps), 0.0, 1.0)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` and all its submodules in eval mode; restore every flag on exit.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout())
        >>> with eval_mode(net):
        ...     net[1].training
        False
        >>> net[1].training
        True
    """
    with restored_modes(model):
        model.eval()
        yield


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Batch-mean cross-entropy from logits upcast to at least fp32, with autocast off.

    Example:
        >>> round(cross_entropy(torch.tensor([[0.0, 0.0]]), torch.tensor([1])).item(), 4)
        0.6931
    """
    with no_autocast(logits.device):
        return F.nll_loss(log_probs(logits), y.long())
