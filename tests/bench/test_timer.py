"""The interleaved timer: call order, what is timed, failures and budgets, and the summaries."""

import pytest

from hybridstitch.bench.timer import InterleavedTimer, WarmupBudgetExceeded, ratio_summary, summary


class Clock:
    """A clock the runs advance by hand, so every duration is known exactly."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def runs(clock, log, durations):
    def make(key):
        def fn():
            log.append(key)
            clock.now += durations[key]
            return f"result-{key}"

        return fn

    return {key: make(key) for key in durations}


def test_warmup_then_rounds_that_call_every_run_once():
    clock, log = Clock(), []
    timer = InterleavedTimer(reps=3, warmup=2, clock=clock)
    for key, fn in runs(clock, log, {"a": 1.0, "b": 2.0, "c": 4.0}).items():
        timer.add(key, fn)
    t = timer.run()
    assert log == ["a", "a", "b", "b", "c", "c"] + ["a", "b", "c"] * 3
    assert [t[k].seconds for k in "abc"] == [[1.0] * 3, [2.0] * 3, [4.0] * 3]
    assert [t[k].warmup_seconds for k in "abc"] == [2.0, 4.0, 8.0]
    assert t["b"].results == ["result-b"] * 3 and all(x.ok for x in t.values())


def test_alternate_reverses_every_second_round():
    clock, log = Clock(), []
    timer = InterleavedTimer(reps=3, warmup=0, alternate=True, clock=clock)
    for key, fn in runs(clock, log, {"a": 1.0, "b": 1.0}).items():
        timer.add(key, fn)
    timer.run()
    assert log == ["a", "b", "b", "a", "a", "b"]


def test_sync_brackets_each_call_and_seconds_of_reads_the_result():
    clock, log = Clock(), []
    timer = InterleavedTimer(reps=2, warmup=1, sync=lambda: log.append("sync"), clock=clock)
    timer.add("a", lambda: log.append("a") or 0.25, seconds_of=lambda result: result * 2)
    timer.add("b", lambda: log.append("b"), warmup_fn=lambda: log.append("b-warm"))
    t = timer.run()
    assert log[:6] == ["sync", "a", "sync", "sync", "b-warm", "sync"]
    assert t["a"].seconds == [0.5, 0.5]  # from the result, not the (still) clock


def test_a_failure_drops_its_group_and_the_rest_go_on():
    clock, log = Clock(), []
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] == 3:  # warm-up, round 1, then fails in round 2
            raise RuntimeError("device lost")

    timer = InterleavedTimer(reps=3, warmup=1, drop_failures=True, clock=clock)
    timer.add(("gpu", "large"), flaky, group="gpu")
    timer.add(("gpu", "small"), lambda: log.append("gpu-small"), group="gpu")
    timer.add(("cpu", "large"), lambda: log.append("cpu-large"), group="cpu")
    t = timer.run()
    for key in (("gpu", "large"), ("gpu", "small")):
        assert not t[key].ok and t[key].phase == "timed" and str(t[key].error) == "device lost"
    assert t[("cpu", "large")].ok and len(t[("cpu", "large")].seconds) == 3
    assert log.count("gpu-small") == 2  # warm-up and round 1; round 2 came after the failure
    calls["n"] = 0
    strict = InterleavedTimer(reps=3, clock=clock)
    strict.add("x", flaky)
    with pytest.raises(RuntimeError, match="device lost"):  # without drop_failures the error is the caller's
        strict.run()


def test_warmup_budget():
    clock = Clock()

    def slow():
        clock.now += 10.0

    timer = InterleavedTimer(reps=1, warmup=1, drop_failures=True, clock=clock)
    timer.add(("compile", "a"), slow, group="compile")
    timer.add(("compile", "b"), slow, group="compile")
    timer.add(("eager", "a"), slow, group="eager")
    timer.budget("compile", 15.0)
    t = timer.run()
    err = t[("compile", "b")].error
    assert isinstance(err, WarmupBudgetExceeded) and (err.budget_s, err.elapsed_s) == (15.0, 20.0)
    assert t[("compile", "a")].phase == "warm-up" and t[("eager", "a")].seconds == [10.0]


def test_summaries():
    assert summary([3.0, 1.0, 2.0, 10.0]) == {"median": 2.5, "min": 1.0, "max": 10.0, "n": 4}
    assert ratio_summary([2.0, 3.0, 8.0], [1.0, 3.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 4.0, "n": 3}
    with pytest.raises(ValueError):
        ratio_summary([1.0, 2.0], [1.0])  # rounds must pair up
    with pytest.raises(ValueError):
        summary([])
    with pytest.raises(ValueError, match="reps must be >= 1"):
        InterleavedTimer(reps=0)
