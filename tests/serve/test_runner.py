"""GenerationRequest's checks and both runners (step-level batching and one at a time), on the testbed's
ONNX Runtime engines."""

from __future__ import annotations

import concurrent.futures
import math
import time

import numpy as np
import pytest

from hybridstitch import HybridStitchError
from hybridstitch.serve.runner import MAX_STEPS, BatchingRunner, GenerationRequest, SequentialRunner, open_runner

from .conftest import GUIDANCE, METHOD, STEPS, decisions, direct_call


def request(prompt="a handwritten 3", seed=0, **kw) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, seed=seed, **{"method": METHOD, "steps": STEPS, "guidance_scale": GUIDANCE, **kw})


@pytest.mark.parametrize("changes,message", [
    (dict(method="hybridstitch-99"), "unknown preset 'hybridstitch-99'"),
    (dict(steps=0), f"steps must be an integer from 1 to {MAX_STEPS}"),
    (dict(steps=MAX_STEPS + 1), f"from 1 to {MAX_STEPS}"),
    (dict(steps=2.5), "steps must be an integer"),
    (dict(steps=True), "steps must be an integer"),
    (dict(guidance_scale=math.nan), "guidance_scale must be a finite number"),
    (dict(guidance_scale=math.inf), "guidance_scale must be a finite number"),
    (dict(seed=2**63), "seed must fit in 64 bits"),
    (dict(seed=-(2**63) - 1), "seed must fit in 64 bits"),
    (dict(seed=1.0), "seed must be an integer"),
    (dict(prompt=b"a handwritten 3"), "prompt must be a string"),
    (dict(negative_prompt=None), "negative_prompt must be a string"),
])
def test_a_bad_request_is_refused_when_made(changes, message):
    with pytest.raises(HybridStitchError, match=message.replace("(", r"\(")):
        request(**changes)


def test_the_int64_range_and_numpy_integers_are_accepted():
    assert request(seed=2**63 - 1).seed == 2**63 - 1
    assert request(seed=-(2**63)).seed == -(2**63)
    assert request(seed=np.int64(5), steps=np.int32(3)).steps == 3


# One image at a time in both: with max_samples=1 the batching runner queues as the sequential one does.
RUNNERS = {
    "batching": lambda pipe, max_queue, max_samples=1: BatchingRunner(pipe, max_samples=max_samples, max_queue=max_queue),
    "sequential": lambda pipe, max_queue, max_samples=1: SequentialRunner(pipe, max_queue=max_queue),
}
each_runner = pytest.mark.parametrize("make_runner", list(RUNNERS.values()), ids=list(RUNNERS))


def test_the_server_runs_the_batching_runner(direct_pipe):
    runner = open_runner(direct_pipe, max_queue=3)
    try:
        assert isinstance(runner, BatchingRunner)
    finally:
        runner.close()


@pytest.mark.parametrize("max_samples", [1, 4])
@each_runner
def test_results_equal_direct_calls_and_a_bad_request_fails_alone(direct_pipe, make_runner, max_samples):
    runner = make_runner(direct_pipe, max_queue=8, max_samples=max_samples)
    try:
        good = [request("a handwritten 3", 0), request("a handwritten 7", 1, method="large"), request("a handwritten 5", 2)]
        # The testbed's prompt encoder refuses what it does not know: an error inside the run itself.
        bad = request("a photo of a cat", 3)
        futures = [runner.submit(good[0]), runner.submit(bad), runner.submit(good[1]), runner.submit(good[2])]
        with pytest.raises(HybridStitchError, match="does not understand 'a photo of a cat'"):
            futures[1].result(timeout=120)
        for req, future in zip(good, [futures[0], futures[2], futures[3]], strict=True):
            image, trace = future.result(timeout=120)
            want_image, want_trace = direct_call(direct_pipe, req.prompt, req.seed, req.method)
            assert image.dtype == np.uint8 and image.shape == want_image.shape == (32, 32, 1)
            np.testing.assert_array_equal(image, want_image)
            assert decisions(trace) == decisions(want_trace)
    finally:
        runner.close()


def test_requests_in_flight_together_share_engine_calls(direct_pipe):
    """Four requests with different presets, step counts and seeds, all in flight: each engine runs
    once per step over the images that need it, and every image is the one it would be alone."""
    reqs = [request("a handwritten 3", 0), request("a handwritten 7", 1, method="large", steps=8),
            request("a handwritten 5", 2, steps=16), request("a handwritten 1", 3, method="testbed-10")]
    runner = BatchingRunner(direct_pipe, max_samples=4, max_queue=4)
    try:
        futures = [runner.submit(r) for r in reqs]
        results = [f.result(timeout=300) for f in futures]
    finally:
        runner.close()
    for req, (image, trace) in zip(reqs, results, strict=True):
        want_image, want_trace = direct_call(direct_pipe, req.prompt, req.seed, req.method, steps=req.steps)
        np.testing.assert_array_equal(image, want_image)
        assert decisions(trace) == decisions(want_trace)
    stats = runner.stats
    assert stats.completed == 4 and max(stats.samples_per_tick) > 1
    # alone, the four would take at least one call per step each: sum(steps) = 48
    assert stats.ticks < sum(r.steps for r in reqs)


@each_runner
def test_a_full_queue_refuses_at_submit_and_close_fails_the_waiting(direct_pipe, make_runner):
    runner = make_runner(direct_pipe, max_queue=2)
    try:
        first = runner.submit(request(steps=60, method="large"))  # ~2 s alone: the queue fills meanwhile
        deadline = time.monotonic() + 30
        while not first.running() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert first.running()
        waiting = [runner.submit(request(seed=s)) for s in (1, 2)]
        with pytest.raises(HybridStitchError, match="the server is busy: 2 requests are already waiting"):
            runner.submit(request(seed=3))
    finally:
        runner.close()
    assert first.done() and first.exception() is None  # the running request finished
    for future in waiting:
        with pytest.raises(HybridStitchError, match="shut down before this request ran; send it again"):
            future.result(timeout=0)
    with pytest.raises(HybridStitchError, match="the runner is closed"):
        runner.submit(request())


@each_runner
def test_submit_takes_only_a_generation_request(direct_pipe, make_runner):
    runner = make_runner(direct_pipe, max_queue=1)
    try:
        with pytest.raises(HybridStitchError, match="submit takes a GenerationRequest, got dict"):
            runner.submit({"prompt": "a handwritten 3", "seed": 0})
        assert isinstance(runner.submit(request(steps=1)), concurrent.futures.Future)
    finally:
        runner.close()
