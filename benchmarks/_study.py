"""What the multi-seed studies share: a resumable results log, a process pool, seed statistics.

- :class:`ResultLog`: a JSON-lines file with one line per finished task, appended (and flushed to
  disk) as each task finishes; reading it back tells a restarted study which tasks are done, so an
  interrupted study continues where it stopped. A torn last line (the process was killed while
  writing) is ignored.
- :func:`make_executor` and :func:`run_tasks`: at most ``jobs`` tasks at a time, each in its own
  worker process (``spawn``), or inline for ``jobs == 1``; no task starts after a deadline.
- Statistics over seeds: :func:`mean_std`, :func:`pooled_std`, :func:`welch_p` (unpaired), and
  :func:`paired` / :func:`paired_ratio` for two arms that share their seeds (same initialisation,
  data order and attack starts), which compare per-seed differences (ratios) and give their
  standard deviation and a t confidence interval.

Used by ``accuracy.py``, ``efficiency.py`` and ``regime.py``.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Two-sided 95% quantiles of Student's t for 1 to 30 degrees of freedom (used without scipy).
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


# -- the results log -------------------------------------------------------------------------


class ResultLog:
    """An append-only JSON-lines log of finished tasks, each entry carrying a ``key``.

    Args:
        path: The file (``None``: keep nothing, e.g. a smoke run without ``--out``).
        resume: Keep the entries already in the file (default); ``False`` starts it empty.
    """

    def __init__(self, path: Path | None, *, resume: bool = True) -> None:
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not resume or not path.exists():
                path.write_text("")
            else:
                self._drop_torn_tail(path)

    @staticmethod
    def _drop_torn_tail(path: Path) -> None:
        """Cut a last line left without its newline (the process was killed while writing it),
        so that the next entry starts on a line of its own."""
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with path.open("r+b") as handle:
                handle.truncate(data.rfind(b"\n") + 1)

    def entries(self) -> list[dict[str, Any]]:
        """Every complete entry, in the order written (a torn last line is skipped)."""
        if self.path is None or not self.path.exists():
            return []
        found = []
        for line in self.path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # the process was killed while writing this line
            if isinstance(entry, dict):
                found.append(entry)
        return found

    def done(self, phase: str | None = None) -> dict[str, dict[str, Any]]:
        """``{key: entry}`` of the finished tasks (of ``phase`` when given; the last entry wins)."""
        return {
            e["key"]: e
            for e in self.entries()
            if "key" in e and (phase is None or e.get("phase") == phase)
        }

    def split(self, keyed: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], list[Any]]:
        """The logged results of the keyed specs, and the specs still to run, in order."""
        done = self.done()
        results = {key: done[key] for key in keyed if key in done}
        return results, [spec for key, spec in keyed.items() if key not in done]

    def append(self, entry: dict[str, Any]) -> None:
        """Write one entry and push it to disk before returning."""
        if self.path is None:
            return
        line = json.dumps(entry, default=str)
        with self.path.open("a") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())


# -- running tasks ---------------------------------------------------------------------------


class InlineExecutor(Executor):
    """Runs each task at once in this process (``--jobs 1``)."""

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:  # handed to the caller through the future
            future.set_exception(error)
        return future


def make_executor(jobs: int) -> Executor:
    """``jobs`` spawned worker processes, or an :class:`InlineExecutor` for one job."""
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    if jobs == 1:
        return InlineExecutor()
    return ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))


def run_tasks(
    executor: Executor,
    tasks: list[tuple[Any, ...]],
    *,
    jobs: int,
    deadline: float = math.inf,
    on_done: Callable[[tuple[Any, ...], Any], None],
) -> int:
    """Runs ``(fn, *args)`` tasks, at most ``jobs`` at a time, starting none after ``deadline``
    (a ``time.perf_counter()`` value); ``on_done(task, result)`` runs as each one finishes.

    Returns how many tasks were not started.
    """
    queue = list(tasks)
    running: dict[Future, tuple[Any, ...]] = {}
    while queue or running:
        while queue and len(running) < jobs and time.perf_counter() < deadline:
            task = queue.pop(0)
            running[executor.submit(*task)] = task
        if not running:
            break
        done, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in done:
            on_done(running.pop(future), future.result())
    return len(queue)


# -- statistics over seeds -------------------------------------------------------------------


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def pooled_std(a: Iterable[float], b: Iterable[float]) -> float:
    """sqrt of the mean of the two samples' variances: the seed-to-seed spread of either arm."""
    return math.sqrt((mean_std(a)[1] ** 2 + mean_std(b)[1] ** 2) / 2)


def cell(values: list[float], seeds: int, scale: float = 100.0, digits: int = 2) -> str:
    """``mean ± std`` (times ``scale``), with the number of runs when fewer than ``seeds``;
    ``n/a`` if there are none."""
    if not values:
        return "n/a"
    mean, std = mean_std(values)
    count = f" (n={len(values)})" if len(values) < seeds else ""
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}{count}"


def welch_p(a: list[float], b: list[float]) -> float:
    """Two-sided Welch t-test p-value (NaN when scipy is missing or the samples are constant)."""
    try:
        from scipy import stats
    except ImportError:
        return float("nan")
    if len(a) < 2 or len(b) < 2 or (statistics.pvariance(a) == 0 and statistics.pvariance(b) == 0):
        return float("nan")
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def t_quantile(df: int) -> float:
    """The two-sided 95% quantile of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        return float("nan")
    try:
        from scipy import stats

        return float(stats.t.ppf(0.975, df))
    except ImportError:
        return _T975[df - 1] if df <= len(_T975) else 1.96


@dataclass(frozen=True)
class Paired:
    """Arm ``b`` against arm ``a`` over the seeds both have (differences are ``b - a``).

    Attributes:
        seeds: The shared seeds.
        mean_a, mean_b: Each arm's mean over those seeds.
        diff: Mean of the per-seed differences (= ``mean_b - mean_a``).
        diff_std: Sample standard deviation of the per-seed differences.
        ci_low, ci_high: 95% t confidence interval of the mean difference (``diff`` itself
            when there is one seed).
        pooled_std: :func:`pooled_std` of the two arms over the shared seeds.
        exceeds_spread: ``|diff| > pooled_std`` (``None`` with one seed).
        ci_excludes_zero: The confidence interval lies on one side of 0 (``None`` with one
            seed).
    """

    seeds: tuple[int, ...]
    mean_a: float
    mean_b: float
    diff: float
    diff_std: float
    ci_low: float
    ci_high: float
    pooled_std: float
    exceeds_spread: bool | None
    ci_excludes_zero: bool | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired(a: dict[int, float], b: dict[int, float]) -> Paired | None:
    """Paired-by-seed comparison of two ``{seed: value}`` maps; ``None`` without a shared seed."""
    seeds = tuple(sorted(set(a) & set(b)))
    if not seeds:
        return None
    xa, xb = [a[s] for s in seeds], [b[s] for s in seeds]
    diffs = [y - x for x, y in zip(xa, xb, strict=True)]
    diff, diff_std = mean_std(diffs)
    n = len(seeds)
    half = t_quantile(n - 1) * diff_std / math.sqrt(n) if n > 1 else 0.0
    spread = pooled_std(xa, xb)
    return Paired(
        seeds=seeds,
        mean_a=statistics.fmean(xa),
        mean_b=statistics.fmean(xb),
        diff=diff,
        diff_std=diff_std,
        ci_low=diff - half,
        ci_high=diff + half,
        pooled_std=spread,
        exceeds_spread=(abs(diff) > spread) if n > 1 else None,
        ci_excludes_zero=(diff - half > 0 or diff + half < 0) if n > 1 else None,
    )


def paired_ratio(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, int] | None:
    """Mean and standard deviation over the shared seeds of ``b[seed] / a[seed]``, and the
    number of seeds; ``None`` without a shared seed."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    ratios = [b[s] / a[s] for s in seeds]
    mean, std = mean_std(ratios)
    return mean, std, len(seeds)


def yes_no(flag: bool | None) -> str:
    """``yes``/``no`` for a test's outcome, ``n/a`` when it could not be made."""
    return "n/a" if flag is None else ("yes" if flag else "no")
