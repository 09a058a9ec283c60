"""A sample's image never depends on its batch-mates: ``d_i``, stages, switch steps, masks and KV
caches are per sample, and the engine calls only group rows.

On the shipped testbed pair (trained: samples really take different schedules), for every preset
with a masked stage and for SRDiffusion, on torch and on ONNX Runtime engines: each of 6 samples
run alone and in one batch make the same stages and switch steps, and final latents within 1e-5
(relative L2).
"""

from __future__ import annotations

import os

import pytest
import torch

from hybridstitch import HybridStitchPipeline, StitchConfig
from hybridstitch.testbed import LARGE_DIR, SMALL_DIR
from hybridstitch.testbed.data import prompt_for

STEPS, GUIDANCE, SAMPLES = 16, 1.25, 6
PRESETS = ("testbed-10", "testbed-30", "testbed-40", "testbed-30-static", "testbed-30-fulllarge", "testbed-30-10",
           "testbed-srdiffusion")

needs_weights = pytest.mark.skipif(not os.path.isfile(os.path.join(LARGE_DIR, "transformer", "config.json")),
                                   reason="testbed weights not trained (python -m hybridstitch.testbed.train)")


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def noise(n: int = SAMPLES) -> torch.Tensor:
    return torch.randn(n, 1, 32, 32, generator=torch.Generator().manual_seed(11))


def run(pipe, config, prompts, latents):
    return pipe(prompt=prompts, config=config, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=latents,
                height=32, width=32, output_type="latent", progress=False)


def assert_invariant(pipe, preset: str) -> list[list[int]]:
    config = StitchConfig.preset(preset)
    prompts = [prompt_for(d) for d in (0, 1, 3, 5, 7, 8)]
    x = noise()
    together = run(pipe, config, prompts, x)
    schedules = []
    for i, prompt in enumerate(prompts):
        alone = run(pipe, config, [prompt], x[i:i + 1])
        a, b = together.traces[i], alone.trace
        assert [s.stage_kind for s in a.steps] == [s.stage_kind for s in b.steps], (preset, i)
        assert a.switch_steps == b.switch_steps, (preset, i)
        assert [s.masked_tokens for s in a.steps] == [s.masked_tokens for s in b.steps]
        assert rel_l2(together.images[i], alone.images[0]) <= 1e-5, (preset, i)
        schedules.append(a.switch_steps)
    return schedules


@pytest.fixture(scope="module")
def testbed_torch():
    return HybridStitchPipeline.from_pretrained(large=LARGE_DIR, small=SMALL_DIR)


@needs_weights
@pytest.mark.parametrize("preset", PRESETS)
def test_torch_samples_are_the_same_alone_or_batched(testbed_torch, preset):
    assert_invariant(testbed_torch, preset)


@needs_weights
def test_the_samples_take_different_schedules(testbed_torch):
    """Without per-sample stages this suite could not fail: the batch's samples really diverge."""
    schedules = assert_invariant(testbed_torch, "testbed-30")
    assert len({tuple(s) for s in schedules}) >= 2, schedules
    assert len({tuple(s) for s in assert_invariant(testbed_torch, "testbed-srdiffusion")}) >= 2


@pytest.fixture(scope="module")
def testbed_ort(testbed_engines):
    return HybridStitchPipeline.from_engines(testbed_engines, num_threads=1)


@needs_weights
@pytest.mark.slow
@pytest.mark.parametrize("preset", ["testbed-30", "testbed-30-10", "testbed-srdiffusion"])
def test_onnxruntime_samples_are_the_same_alone_or_batched(testbed_ort, testbed_torch, preset):
    assert_invariant(testbed_ort, preset)
    # and the engines make torch's decisions
    config = StitchConfig.preset(preset)
    prompts = [prompt_for(d) for d in (2, 4, 6)]
    a, b = run(testbed_ort, config, prompts, noise(3)), run(testbed_torch, config, prompts, noise(3))
    assert [t.switch_steps for t in a.traces] == [t.switch_steps for t in b.traces]
    assert rel_l2(a.images, b.images) <= 1e-5


@needs_weights
@pytest.mark.parametrize("preset", ["testbed-30", "testbed-30-fulllarge"])
def test_concurrent_stage2_changes_nothing(testbed_torch, preset):
    """The small call in a second thread (``concurrent_stage2``) gives the same stages and images."""
    config = StitchConfig.preset(preset)
    prompts = [prompt_for(d) for d in (0, 3, 8)]
    concurrent = HybridStitchPipeline(testbed_torch.large, testbed_torch.small, testbed_torch.scheduler,
                                      testbed_torch.conditioner, concurrent_stage2=True)
    assert concurrent.stage2_pool is not None
    a, b = run(concurrent, config, prompts, noise(3)), run(testbed_torch, config, prompts, noise(3))
    assert [t.switch_steps for t in a.traces] == [t.switch_steps for t in b.traces]
    assert any(s.stage_kind == "masked" for s in a.traces[0].steps)
    assert torch.equal(a.images, b.images)
