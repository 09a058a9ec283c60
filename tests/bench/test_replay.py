"""Replayed schedules: stages from given switch steps, and the replay driver against the pipeline."""

import pytest
import torch

from hybridstitch import HybridStitchError, StitchConfig
from hybridstitch.bench.replay import ReplaySwitches, replay_denoise, replay_stages
from hybridstitch.conditioning import Conditioning
from hybridstitch.policy import Stage
from tests.conftest import text_inputs

SW = ReplaySwitches(stitch=(3, 7), tstitch=4, srdiffusion=5)


def kinds(name, steps=10, switches=SW):
    return "".join({"large": "L", "masked": "M", "small": "S"}[s.kind] for s in replay_stages(StitchConfig.preset(name), steps, switches))


def test_replayed_schedules():
    assert kinds("large") == "L" * 10
    assert kinds("small") == "S" * 10
    assert kinds("t-stitch") == "SSSSLLLLLL"  # small first
    assert kinds("srdiffusion") == "LLLLLSSSSS"
    assert kinds("hybridstitch-30") == "LLLMMMMSSS"
    assert kinds("hybridstitch-30-fulllarge") == "LLLMMMMSSS"
    stages = replay_stages(StitchConfig.preset("hybridstitch-30-10"), 10, SW)  # [3, 7) split evenly
    assert [s.mask_ratio for s in stages[3:7]] == [0.3, 0.3, 0.1, 0.1]
    assert [s.index for s in stages] == [1, 1, 1, 2, 2, 3, 3, 4, 4, 4]
    multi = ReplaySwitches(stitch=(3, 7), tstitch=4, srdiffusion=5, multi=(2, 3, 8))
    assert kinds("hybridstitch-30-10", switches=multi) == "LLMMMMMMSS"
    d = ReplaySwitches.default(50)
    assert (d.stitch, d.tstitch, d.srdiffusion) == ((15, 35), 20, 25)


def test_replay_errors():
    with pytest.raises(HybridStitchError, match="first masked step must be >= 2"):
        replay_stages(StitchConfig.preset("hybridstitch-30"), 10, ReplaySwitches((1, 5), 4, 5))
    with pytest.raises(HybridStitchError, match="non-decreasing"):
        replay_stages(StitchConfig.preset("hybridstitch-30"), 10, ReplaySwitches((6, 5), 4, 5))
    with pytest.raises(HybridStitchError, match="needs 3 switch steps"):
        replay_stages(StitchConfig.preset("hybridstitch-30-10"), 10, ReplaySwitches((3, 7), 4, 5, multi=(3, 7)))


def _pipe_run(pipe, config, steps=8, **kw):
    emb = text_inputs(1)
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    out = pipe(config=config, num_inference_steps=steps, guidance_scale=4.5, height=64, width=64, latents=latents,
               output_type="latent", progress=False, **emb, **kw)
    cond = Conditioning(torch.cat([emb["negative_prompt_embeds"], emb["prompt_embeds"]]),
                        torch.cat([emb["negative_pooled_prompt_embeds"], emb["pooled_prompt_embeds"]]))
    return out, latents, cond


@pytest.mark.filterwarnings("ignore::hybridstitch.latency_model.LatencyBoundWarning")  # tiny models
@pytest.mark.parametrize("mode", ["dynamic", "static", "full"])
def test_replay_reproduces_the_pipeline(tiny_pipe, mode):
    # The replay driver given the pipeline's own stage decisions gives the pipeline's latents, bit for bit.
    cfg = StitchConfig(mask_ratios=(0.3, 0.1), thresholds=(float("inf"), 1e9, 1e8), name="all-stages",
                       mask_mode="static" if mode == "static" else "dynamic", stage2_large="full" if mode == "full" else "masked")
    out, latents, cond = _pipe_run(tiny_pipe, cfg)
    stages = [Stage(s.stage, s.stage_kind, s.mask_ratio) for s in out.trace.steps]
    replayed, (trace,) = replay_denoise(tiny_pipe.large, tiny_pipe.small, tiny_pipe.scheduler, latents, cond, cfg, stages, 4.5)
    assert torch.equal(replayed, out.images)
    assert trace.switch_steps == out.trace.switch_steps == [2, 3, 4]
    assert [s.masked_tokens for s in trace.steps] == [s.masked_tokens for s in out.trace.steps]
    assert [set(s.seconds) for s in trace.steps] == [set(s.seconds) for s in out.trace.steps]
