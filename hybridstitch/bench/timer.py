"""One interleaved timer for every measurement harness.

Runs compared against each other are timed in *rounds*: after a warm-up of every run, each
round calls every run once, in turn, so a slow phase of a shared machine (another job, a
thermal dip) hits all of them alike instead of whichever happened to run then. Medians with
min-max summarise the repetitions; ratios are taken per round (:func:`ratio_summary`), which
cancels drifts slower than a round.

    timer = InterleavedTimer(reps=5)
    timer.add("large", lambda: large.forward(*args))
    timer.add("small", lambda: small.forward(*args))
    t = timer.run()                    # {"large": Timing, "small": Timing}
    summary(t["large"].seconds)        # {"median": ..., "min": ..., "max": ..., "n": 5}

Runs may share a *group* (a backend): with ``drop_failures=True`` an exception in any run of
a group drops the whole group, recorded on its timings, while the other groups go on.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable


class WarmupBudgetExceeded(Exception):
    """A group's warm-up took longer than the budget given to :meth:`InterleavedTimer.budget`."""

    def __init__(self, group: Hashable, budget_s: float, elapsed_s: float):
        super().__init__(f"warm-up of {group} passed its {budget_s:g} s budget after {elapsed_s:.0f} s")
        self.group, self.budget_s, self.elapsed_s = group, budget_s, elapsed_s


@dataclass
class Timing:
    """What the timer recorded of one run."""

    seconds: list[float] = field(default_factory=list)  # one per timed round
    results: list[Any] = field(default_factory=list)  # what each timed call returned
    warmup_seconds: float = 0.0
    error: BaseException | None = None  # why the run (or its group) was dropped
    phase: str | None = None  # where that happened: "warm-up" or "timed"

    @property
    def ok(self) -> bool:
        return self.error is None


def summary(xs) -> dict:
    """Median, min, max and count of a list of numbers (seconds, ratios)."""
    xs = list(xs)
    if not xs:
        raise ValueError("summary of no samples")
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def ratio_summary(numerator, denominator) -> dict:
    """:func:`summary` of the per-round ratios ``numerator[i] / denominator[i]``."""
    return summary(a / b for a, b in zip(numerator, denominator, strict=True))


@dataclass(eq=False)  # runs are compared by identity
class _Run:
    key: Hashable
    fn: Callable[[], Any]
    warmup_fn: Callable[[], Any]
    seconds_of: Callable[[Any], float] | None
    group: Hashable


class InterleavedTimer:
    """Warm up every run ``warmup`` times, then ``reps`` rounds that call every run once.

    Args:
        reps: timed rounds.
        warmup: untimed calls of each run before the first round (JIT compilation, allocator,
            session initialisation).
        alternate: reverse the order of the runs in every second round, so no run always
            follows the same neighbour (caches, frequency boosts).
        sync: called before the clock is read at the start and the end of each call (e.g.
            ``torch.cuda.synchronize``), so asynchronous work is counted.
        drop_failures: catch exceptions and drop the failing run's group (recorded in its
            :class:`Timing`) instead of raising.
        progress: a description to show a progress bar under, or None for none.
        clock: seconds as a float (``time.perf_counter``).
    """

    def __init__(self, reps: int, warmup: int = 1, *, alternate: bool = False, sync: Callable[[], None] | None = None,
                 drop_failures: bool = False, progress: str | None = None, clock: Callable[[], float] = time.perf_counter):
        if reps < 1:
            raise ValueError(f"reps must be >= 1, got {reps}")
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        self.reps, self.warmup, self.alternate = reps, warmup, alternate
        self.sync, self.drop_failures, self.progress, self.clock = sync, drop_failures, progress, clock
        self._runs: dict[Hashable, _Run] = {}
        self._budgets: dict[Hashable, float] = {}

    def add(self, key: Hashable, fn: Callable[[], Any], *, warmup_fn: Callable[[], Any] | None = None,
            seconds_of: Callable[[Any], float] | None = None, group: Hashable | None = None) -> None:
        """Time ``fn()`` as ``key``. ``warmup_fn``: what the warm-up calls instead (a shorter
        workload that still compiles every path); ``seconds_of``: read the time from the call's
        result (a trace that timed itself) instead of the clock; ``group``: see the class."""
        if key in self._runs:
            raise ValueError(f"run {key!r} added twice")
        self._runs[key] = _Run(key, fn, warmup_fn or fn, seconds_of, key if group is None else group)

    def budget(self, group: Hashable, seconds: float) -> None:
        """Give up on ``group`` (:class:`WarmupBudgetExceeded`) once its warm-up has taken ``seconds``."""
        self._budgets[group] = seconds

    def _call(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        if self.sync is not None:
            self.sync()
        t0 = self.clock()
        out = fn()
        if self.sync is not None:
            self.sync()
        return self.clock() - t0, out

    def run(self) -> dict[Hashable, Timing]:
        """Warm up, then time; returns one :class:`Timing` per run, in the order added."""
        from tqdm.auto import tqdm

        timings = {key: Timing() for key in self._runs}
        live = list(self._runs.values())
        per_run = self.warmup + self.reps
        done = {key: 0 for key in self._runs}
        bar = tqdm(total=len(live) * per_run, desc=self.progress, unit="run", disable=self.progress is None)

        def label(run: _Run) -> str:
            return " ".join(map(str, run.key)) if isinstance(run.key, tuple) else str(run.key)

        def drop(group: Hashable, error: BaseException, phase: str) -> None:
            for r in [r for r in live if r.group == group]:
                timings[r.key].error, timings[r.key].phase = error, phase
                bar.update(per_run - done[r.key])  # the calls it will not make
                live.remove(r)

        def attempt(run: _Run, fn: Callable[[], Any], phase: str):
            try:
                return self._call(fn)
            except Exception as e:
                if not self.drop_failures:
                    raise
                drop(run.group, e, phase)
                return None

        group_warmup: dict[Hashable, float] = {}
        for run in list(live):
            for _ in range(self.warmup):
                if run not in live:  # its group was dropped
                    break
                bar.set_postfix_str(f"{label(run)} warm-up")
                got = attempt(run, run.warmup_fn, "warm-up")
                if got is None:
                    break
                timings[run.key].warmup_seconds += got[0]
                group_warmup[run.group] = group_warmup.get(run.group, 0.0) + got[0]
                done[run.key] += 1
                bar.update(1)
                limit = self._budgets.get(run.group)
                if limit is not None and group_warmup[run.group] > limit:
                    error = WarmupBudgetExceeded(run.group, limit, group_warmup[run.group])
                    if not self.drop_failures:
                        raise error
                    drop(run.group, error, "warm-up")
                    break
        for rep in range(self.reps):
            order = live[::-1] if self.alternate and rep % 2 else list(live)
            for run in order:
                if run not in live:  # dropped earlier in this round
                    continue
                bar.set_postfix_str(label(run))
                got = attempt(run, run.fn, "timed")
                if got is None:
                    continue
                seconds, out = got
                t = timings[run.key]
                t.seconds.append(run.seconds_of(out) if run.seconds_of is not None else seconds)
                t.results.append(out)
                done[run.key] += 1
                bar.update(1)
        bar.close()
        return timings
