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


def build_tiny_sd3_pipeline(transformer):
    """A complete diffusers ``StableDiffusion3Pipeline`` with tiny CLIP-L/G, T5 and VAE, all local.

    No hub: the tokenizers are built from a character vocabulary (CLIP BPE) and a word-level
    vocabulary (T5). Widths fit the tiny transformers: CLIP hidden 8+8 padded to T5's 32 =
    joint_attention_dim; pooled = 8+8 = 16 = pooled_projection_dim.
    """
    import json
    import tempfile

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789.,!":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "vocab.json"), "w") as f:
            json.dump(vocab, f)
        with open(os.path.join(d, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n")
        clip_tok = CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"), model_max_length=77)
    # A Unigram vocabulary, the model type transformers' T5 tokenizer reloads
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581a", -1.0), ("\u2581cat", -1.0), ("\u2581dog", -1.0)]
    words = Tokenizer(models.Unigram(pieces, unk_id=2))
    words.pre_tokenizer = pre_tokenizers.Metaspace()
    t5_tok = T5TokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0)
    t5_tok.model_max_length = 256

    def clip(seed):
        torch.manual_seed(seed)
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, projection_dim=8, bos_token_id=0, eos_token_id=1, pad_token_id=1))

    torch.manual_seed(3)
    t5 = T5EncoderModel(T5Config(vocab_size=8, d_model=JOINT_DIM, d_kv=8, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(4, 4, 4, 4), layers_per_block=1,
        norm_num_groups=2, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=clip(1), tokenizer=clip_tok, text_encoder_2=clip(2), tokenizer_2=clip_tok,
        text_encoder_3=t5, tokenizer_3=t5_tok)


@pytest.fixture(scope="session")
def tiny_sd3_dirs(tmp_path_factory, tiny_dirs):
    """A full SD3 pipeline folder as the large model, a transformer-only folder as the small."""
    root = tmp_path_factory.mktemp("sd3full")
    pipe = build_tiny_sd3_pipeline(tiny_transformer("large", 0))
    pipe.save_pretrained(str(root / "large"))
    return str(root / "large"), tiny_dirs[1]


@pytest.fixture(scope="session")
def tiny_engines(tiny_dirs, tmp_path_factory):
    """ONNX Runtime engines of the tiny pair, exported once per session: 64x64 pixels (8x8 latent,
    16 image tokens), batch 2 (one image with CFG), 7 text tokens, buckets 0.1 and 0.3, fp32.
    Tests that damage an engine folder work on a copy."""
    from hybridstitch.export import ExportRequest, export_engines

    out = str(tmp_path_factory.mktemp("engines"))
    req = ExportRequest(large=tiny_dirs[0], small=tiny_dirs[1], height=64, width=64, batch=2,
                        buckets=(0.1, 0.3), text_tokens=7)
    export_engines(req, out, progress=False)
    return out, req


@pytest.fixture(scope="session")
def testbed_engines(tmp_path_factory):
    """ONNX Runtime engines of the shipped testbed pair (32x32, buckets 0.1 and 0.3), exported once per session."""
    from hybridstitch.export import ExportRequest, export_engines
    from hybridstitch.testbed import LARGE_DIR, SMALL_DIR

    if not os.path.isfile(os.path.join(LARGE_DIR, "transformer", "config.json")):
        pytest.skip("testbed weights not trained (python -m hybridstitch.testbed.train)")
    folder = str(tmp_path_factory.mktemp("testbed-engines"))
    export_engines(ExportRequest(large=LARGE_DIR, small=SMALL_DIR, height=32, width=32, buckets=(0.1, 0.3)), folder,
                   progress=False)
    return folder
