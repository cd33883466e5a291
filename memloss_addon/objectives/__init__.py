"""Reference base objectives that return ``(loss, adv, logits)`` so the memory attaches in one line.

Each objective is called as ``fn(model, x, y, *, eps, step_size, steps, ..., init=None)`` on
inputs in ``[0, 1]`` and returns an :class:`ObjectiveOutput`:

    out = trades(model, x, y, eps=8 / 255, step_size=2 / 255, steps=10, beta=6.0)
    loss = out.loss + memory(idx, x, out.adv, out.logits, y)

``init`` starts the attack from given points instead of the method's usual (random) start, for
instance from the memory (:meth:`memloss_addon.MemoryWrapper.recall`), so that a few steps per
epoch accumulate into a strong attack across epochs.

Every attack restores the train/eval flag of the model and of each submodule, and every BatchNorm
attribute it changes, exactly as found, and leaves no gradient on the model's parameters.
"""

from ._common import ObjectiveOutput
from .hat import hat
from .mart import mart
from .pgd_at import pgd_at
from .single_step import single_step
from .squeeze import squeeze
from .trades import trades

__all__ = ["ObjectiveOutput", "hat", "mart", "pgd_at", "single_step", "squeeze", "trades"]
