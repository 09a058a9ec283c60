"""Continuous (step-level) batching: requests with different prompts, presets, step counts and
arrival times share engine calls, and each gets the image it gets alone."""

from __future__ import annotations

import threading

import pytest
import torch

from hybridstitch import HybridStitchError, HybridStitchPipeline
from hybridstitch.scheduler import StepScheduler
from hybridstitch.testbed.data import prompt_for

GUIDANCE = 1.25


def rel_l2(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def pipe(testbed_engines):
    return HybridStitchPipeline.from_engines(testbed_engines, num_threads=1)


REQUESTS = [  # (digit, preset, steps, seed)
    (3, "testbed-30", 14, 0),
    (7, "testbed-10", 10, 1),
    (1, "testbed-srdiffusion", 12, 2),
    (8, "large", 8, 3),
]


def kwargs(digit, preset, steps, seed):
    return dict(prompt=prompt_for(digit), config=preset, num_inference_steps=steps, guidance_scale=GUIDANCE,
                generator=torch.Generator().manual_seed(seed), output_type="latent", progress=False)


def test_four_requests_share_engine_calls_and_each_gets_its_own_image(pipe):
    alone, sequential_calls = [], 0
    for r in REQUESTS:
        one = StepScheduler(pipe)
        future = one.submit(**kwargs(*r))
        one.run_until_idle()
        alone.append(future.result())
        sequential_calls += one.stats.engine_calls
    sched = StepScheduler(pipe, max_samples=8)
    futures = [sched.submit(**kwargs(*r)) for r in REQUESTS[:2]]
    for _ in range(3):  # the others arrive three steps later
        sched.tick()
    futures += [sched.submit(**kwargs(*r)) for r in REQUESTS[2:]]
    sched.run_until_idle()
    for future, ref, r in zip(futures, alone, REQUESTS):
        out = future.result()
        assert out.trace.switch_steps == ref.trace.switch_steps, r
        assert [s.stage_kind for s in out.trace.steps] == [s.stage_kind for s in ref.trace.steps], r
        assert rel_l2(out.images, ref.images) <= 1e-5, r
        assert len(out.trace.steps) == r[2]
    assert sched.stats.engine_calls < sequential_calls
    assert max(sched.stats.samples_per_tick) == 4 and sched.stats.completed == 4
    # and a direct call gives the same
    direct = pipe(**kwargs(*REQUESTS[0]))
    assert rel_l2(direct.images, alone[0].images) <= 1e-5


def test_requests_no_engine_can_serve_are_refused_at_submit(pipe):
    sched = StepScheduler(pipe, max_samples=2, max_queue=1)
    with pytest.raises(HybridStitchError, match="unknown preset"):
        sched.submit(**{**kwargs(*REQUESTS[0]), "config": "fastest"})
    with pytest.raises(HybridStitchError, match="built for 32x32"):
        sched.submit(**kwargs(*REQUESTS[0]), height=64, width=64)
    with pytest.raises(HybridStitchError, match="at most 2 at once"):
        sched.submit(**{**kwargs(*REQUESTS[0]), "prompt": [prompt_for(d) for d in range(3)]})
    sched.submit(**kwargs(*REQUESTS[0]))
    with pytest.raises(HybridStitchError, match="queue is full"):
        sched.submit(**kwargs(*REQUESTS[1]))
    assert sched.stats.ticks == 0  # nothing ran


class FailingOn:
    """The large engine, failing every call that holds a row of latents equal to ``marker`` (a request's own
    noise): an engine error that belongs to one request."""

    def __init__(self, inner, marker: float):
        self.inner, self.marker = inner, marker

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _check(self, latents):
        if bool((latents == self.marker).flatten(1).all(1).any()):
            raise RuntimeError("the engine failed on this request's rows")

    def forward(self, latents, *args):
        self._check(latents)
        return self.inner.forward(latents, *args)

    def forward_store(self, latents, *args):
        self._check(latents)
        return self.inner.forward_store(latents, *args)


def test_a_failing_request_fails_alone(pipe):
    flaky = HybridStitchPipeline(FailingOn(pipe.large, 0.125), pipe.small, pipe.scheduler, pipe.conditioner,
                                 device=pipe.device, dtype=pipe.dtype, default_sample_size=pipe.default_sample_size,
                                 vae_scale_factor=pipe.vae_scale_factor)
    sched = StepScheduler(flaky)
    good = sched.submit(**kwargs(*REQUESTS[0]))
    bad = sched.submit(**{**kwargs(*REQUESTS[1]), "generator": None}, latents=torch.full((1, 1, 32, 32), 0.125))
    sched.run_until_idle()  # the shared first call fails, each request is retried alone: only the bad one fails
    with pytest.raises(HybridStitchError, match="the large engine call failed at step 0 .*this request's rows"):
        bad.result()
    ref = pipe(**kwargs(*REQUESTS[0]))
    assert rel_l2(good.result().images, ref.images) <= 1e-5
    assert sched.stats.failed == 1 and sched.stats.completed == 1


def test_a_worker_thread_serves_callers_of_several_threads(pipe):
    results = {}
    with StepScheduler(pipe) as sched:
        def client(r):
            results[r] = sched.submit(**kwargs(*r)).result(timeout=120)

        threads = [threading.Thread(target=client, args=(r,)) for r in REQUESTS[:3]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for r in REQUESTS[:3]:
        assert rel_l2(results[r].images, pipe(**kwargs(*r)).images) <= 1e-5
    sched2 = StepScheduler(pipe).start()
    sched2.close()
    with pytest.raises(HybridStitchError, match="closed"):
        sched2.submit(**kwargs(*REQUESTS[0]))


def test_images_in_flight_stay_within_the_engines_largest_batch(pipe, monkeypatch):
    """TensorRT engines end at the exported batch: the scheduler admits a request only while every
    row in flight fits one call (here 4 rows: two images with guidance), and the rest wait."""
    for denoiser in (pipe.large, pipe.small):
        monkeypatch.setattr(denoiser, "batch_problem", lambda rows: "hold profiles up to batch 4" if rows > 4 else None,
                            raising=False)
    sched = StepScheduler(pipe, max_samples=8)
    futures = [sched.submit(**kwargs(*r)) for r in REQUESTS]
    sched.run_until_idle()
    assert all(f.exception() is None for f in futures)
    assert max(sched.stats.samples_per_tick) == 2 and sched.stats.completed == 4


def test_close_can_finish_the_running_and_fails_the_queued(pipe):
    sched = StepScheduler(pipe, max_samples=1)
    running = sched.submit(**kwargs(*REQUESTS[0]))
    queued = sched.submit(**kwargs(*REQUESTS[1]))
    sched.tick()  # admits the first only
    sched.close(finish_running=True)
    assert running.result().trace.num_steps == REQUESTS[0][2]
    with pytest.raises(HybridStitchError, match="shut down before this request ran"):
        queued.result(timeout=0)
    with pytest.raises(HybridStitchError, match="the scheduler is closed"):
        sched.submit(**kwargs(*REQUESTS[0]))
