"""The memory's counters: cumulative since construction, and per window (an epoch, say).

Counts are plain ints on the host. The sums of terms and weights stay on the batch's device, so a
training step never waits for the GPU; reading a report synchronizes once.

Example:
    >>> import torch
    >>> counters = Counters()
    >>> counters.count(calls=1, terms_computed=1, rows_read=2)
    >>> counters.add_term(torch.tensor(0.5), torch.tensor([0.25, 0.75]))
    >>> report = counters.report()
    >>> report["mean_term"], report["mean_weight"], report["memory_accuracy"]
    (0.5, 0.5, None)
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["COUNTS", "Counters"]

COUNTS = (
    "calls",  # memory calls
    "terms_computed",  # calls that ran the memory forward pass
    "rows_read",  # memory examples that went through the model for the term
    "rows_skipped",  # filled rows that selective replay left out
    "rows_written",  # examples stored
    "rejected_rows",  # rows of adv not stored (NaN, Inf, overflow)
    "rows_classified",  # diagnostics: memory examples classified with the current model
    "rows_correct",  # ... classified correctly now
    "rows_seen_at_write",  # ... of which it is known whether they fooled the model when made
    "rows_forgotten",  # ... did not fool the model when made, fool it now
    "rows_recovered",  # ... fooled the model when made, classified correctly now
)
_FIRST_COUNTS = 5  # counts in every saved state; later ones default to 0 in older states


class Counters:
    """Cumulative counts and sums of a memory's calls."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(COUNTS, 0)
        self.term_sum: torch.Tensor | float = 0.0
        self.weight_sum: torch.Tensor | float = 0.0
        self.last_term: torch.Tensor | float | None = None

    def count(self, **increments: int) -> None:
        """Adds to named counts."""
        for name, value in increments.items():
            self.counts[name] += value

    def add_term(self, term: torch.Tensor, weights: torch.Tensor) -> None:
        """Adds a computed term and the weights of its rows, without a device sync."""
        value = term.detach()
        # The running sums are float64 tensors: adding a float32 value promotes it.
        self.term_sum = _on(self.term_sum, value.device) + value
        self.weight_sum = _on(self.weight_sum, value.device) + weights.detach().sum()
        self.last_term = value

    def copy(self) -> Counters:
        """A snapshot (the start of a window)."""
        snapshot = Counters()
        snapshot.counts = dict(self.counts)
        snapshot.term_sum = self.term_sum  # sums are replaced by add_term, never changed in place
        snapshot.weight_sum = self.weight_sum
        snapshot.last_term = self.last_term
        return snapshot

    def report(self, since: Counters | None = None) -> dict[str, int | float | None]:
        """Counts and means, over everything or since the snapshot ``since``.

        Means are ``None`` where nothing was computed: ``mean_term`` (mean over the calls that
        computed a term), ``mean_weight`` (mean weight of the rows read), ``memory_accuracy``
        (``rows_correct / rows_classified``), ``last_term`` (before the first call).
        """
        counts = dict(self.counts)
        term_sum, weight_sum = _value(self.term_sum), _value(self.weight_sum)
        if since is not None:
            counts = {name: counts[name] - since.counts[name] for name in COUNTS}
            term_sum -= _value(since.term_sum)
            weight_sum -= _value(since.weight_sum)
        last = None if self.last_term is None else _value(self.last_term)
        if since is not None and counts["calls"] == 0:
            last = None
        return {
            **counts,
            "mean_term": term_sum / counts["terms_computed"] if counts["terms_computed"] else None,
            "mean_weight": weight_sum / counts["rows_read"] if counts["rows_read"] else None,
            "memory_accuracy": (
                counts["rows_correct"] / counts["rows_classified"]
                if counts["rows_classified"]
                else None
            ),
            "last_term": last,
        }

    def state(self) -> dict[str, Any]:
        """Plain values for a saved state (synchronizes with the device once)."""
        last = None if self.last_term is None else _value(self.last_term)
        return {
            **self.counts,
            "term_sum": _value(self.term_sum),
            "weight_sum": _value(self.weight_sum),
            "last_term": last,
        }

    @staticmethod
    def check_state(state: object) -> dict[str, Any]:
        """Raises ValueError unless ``state`` is a counters state (older ones lack later counts)."""
        if not isinstance(state, dict):
            raise ValueError("memory state has no 'counters' dict")
        for position, key in enumerate(COUNTS):
            value = state.get(key, None if position < _FIRST_COUNTS else 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"memory state counter {key!r} must be an int >= 0, got {value!r}")
        for key in ("term_sum", "weight_sum"):
            if not isinstance(state.get(key), (int, float)):
                raise ValueError(f"memory state counter {key!r} must be a number")
        last = state.get("last_term")
        if last is not None and not isinstance(last, (int, float)):
            raise ValueError("memory state counter 'last_term' must be a number or None")
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Counters:
        """Counters from a checked state."""
        counters = cls()
        counters.counts = {key: int(state.get(key, 0)) for key in COUNTS}
        counters.term_sum = float(state["term_sum"])
        counters.weight_sum = float(state["weight_sum"])
        last = state.get("last_term")
        # Older states wrote NaN where there was no term yet.
        counters.last_term = None if last is None or math.isnan(last) else float(last)
        return counters


def _on(value: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value if value.device == device else value.to(device)
    return torch.tensor(value, dtype=torch.float64, device=device)


def _value(value: torch.Tensor | float) -> float:
    return float(value)
