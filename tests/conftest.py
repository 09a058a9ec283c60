"""Shared fixtures: tiny SD3-family checkpoints written with ``save_pretrained``.

The "large" is SD3.5-style (qk rms_norm, one dual-attention block), the "small" SD3
Medium-style (no qk-norm), with different widths and depths and the same 16 latent channels
and patch 2, as the real pair. They go through the real loading code.
"""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(1)

JOINT_DIM = 32
POOLED_DIM = 16


def tiny_transformer(kind: str, seed: int = 0, **overrides):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    if kind == "large":
        cfg = dict(num_layers=3, num_attention_heads=4, attention_head_dim=8, qk_norm="rms_norm", dual_attention_layers=(0,))
    else:
        cfg = dict(num_layers=2, num_attention_heads=2, attention_head_dim=8, qk_norm=None, dual_attention_layers=())
    cfg.update(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, joint_attention_dim=JOINT_DIM,
        pooled_projection_dim=POOLED_DIM, pos_embed_max_size=16,
    )
    cfg.update(overrides)
    cfg["caption_projection_dim"] = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    model = SD3Transformer2DModel(**cfg)
    # diffusers zero-initialises nothing here, but make the output layers non-trivial so
    # differences between methods show up in the tests.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 1 and torch.count_nonzero(p) == 0:
                p.normal_(0, 0.02)
    return model.eval()


def write_checkpoint(folder: str, model, with_scheduler: bool = False) -> str:
    model.save_pretrained(os.path.join(folder, "transformer"))
    if with_scheduler:
        from diffusers import FlowMatchEulerDiscreteScheduler

        FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(os.path.join(folder, "scheduler"))
    return folder


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    large = write_checkpoint(str(root / "large"), tiny_transformer("large", 0), with_scheduler=True)
    small = write_checkpoint(str(root / "small"), tiny_transformer("small", 1))
    return large, small


@pytest.fixture(scope="session")
def tiny_pipe(tiny_dirs):
    from hybridstitch import HybridStitchPipeline

    return HybridStitchPipeline.from_pretrained(large=tiny_dirs[0], small=tiny_dirs[1])


def text_inputs(batch: int, tokens: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        prompt_embeds=torch.randn(batch, tokens, JOINT_DIM, generator=g),
        pooled_prompt_embeds=torch.randn(batch, POOLED_DIM, generator=g),
        negative_prompt_embeds=torch.randn(batch, tokens, JOINT_DIM, generator=g),
        negative_pooled_prompt_embeds=torch.randn(batch, POOLED_DIM, generator=g),
    )
