"""Checkpoints written the way SD3.5 users hold them: single ``.safetensors`` files with SAI's
original keys (``model.diffusion_model.joint_blocks...``, as in ``sd3.5_large.safetensors``) or
diffusers' keys, in any dtype including fp8, and Hugging Face cache entries
(``models--org--name/{refs/main, snapshots/<rev>/..., blobs/}``).

The original layout is diffusers' single-file conversion run backwards
(``convert_sd3_transformer_checkpoint_to_diffusers``): q, k, v fused into ``qkv``, the
AdaLayerNormContinuous projections of the last context block and the final layer in
(shift, scale) order instead of diffusers' (scale, shift).
"""

from __future__ import annotations

import hashlib
import os
import shutil

import torch

SAI_PREFIX = "model.diffusion_model."


def _swap_halves(w: torch.Tensor) -> torch.Tensor:
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def original_sd3_state_dict(model, prefix: str = SAI_PREFIX) -> dict[str, torch.Tensor]:
    """A diffusers ``SD3Transformer2DModel``'s weights under SAI's original key names."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n = model.config.num_layers
    out = {
        "pos_embed": sd.pop("pos_embed.pos_embed"),
        "x_embedder.proj.weight": sd.pop("pos_embed.proj.weight"),
        "x_embedder.proj.bias": sd.pop("pos_embed.proj.bias"),
    }
    renames = (("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
               ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
               ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
               ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
               ("context_embedder", "context_embedder"), ("final_layer.linear", "proj_out"))
    for s in ("weight", "bias"):
        for a, b in renames:
            out[f"{a}.{s}"] = sd.pop(f"{b}.{s}")
        out[f"final_layer.adaLN_modulation.1.{s}"] = _swap_halves(sd.pop(f"norm_out.linear.{s}"))
    for i in range(n):
        b_, j = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        last = i == n - 1  # context_pre_only: no context output projection or feed-forward
        for s in ("weight", "bias"):
            out[f"{j}.x_block.attn.qkv.{s}"] = torch.cat([sd.pop(f"{b_}.attn.to_{c}.{s}") for c in "qkv"])
            out[f"{j}.context_block.attn.qkv.{s}"] = torch.cat([sd.pop(f"{b_}.attn.add_{c}_proj.{s}") for c in "qkv"])
            out[f"{j}.x_block.attn.proj.{s}"] = sd.pop(f"{b_}.attn.to_out.0.{s}")
            out[f"{j}.x_block.adaLN_modulation.1.{s}"] = sd.pop(f"{b_}.norm1.linear.{s}")
            ctx = sd.pop(f"{b_}.norm1_context.linear.{s}")
            out[f"{j}.context_block.adaLN_modulation.1.{s}"] = _swap_halves(ctx) if last else ctx
            out[f"{j}.x_block.mlp.fc1.{s}"] = sd.pop(f"{b_}.ff.net.0.proj.{s}")
            out[f"{j}.x_block.mlp.fc2.{s}"] = sd.pop(f"{b_}.ff.net.2.{s}")
            if not last:
                out[f"{j}.context_block.attn.proj.{s}"] = sd.pop(f"{b_}.attn.to_add_out.{s}")
                out[f"{j}.context_block.mlp.fc1.{s}"] = sd.pop(f"{b_}.ff_context.net.0.proj.{s}")
                out[f"{j}.context_block.mlp.fc2.{s}"] = sd.pop(f"{b_}.ff_context.net.2.{s}")
            if f"{b_}.attn2.to_q.{s}" in sd:  # dual attention (SD3.5 Medium style)
                out[f"{j}.x_block.attn2.qkv.{s}"] = torch.cat([sd.pop(f"{b_}.attn2.to_{c}.{s}") for c in "qkv"])
                out[f"{j}.x_block.attn2.proj.{s}"] = sd.pop(f"{b_}.attn2.to_out.0.{s}")
        for a, b in (("x_block.attn.ln_q", "attn.norm_q"), ("x_block.attn.ln_k", "attn.norm_k"),
                     ("context_block.attn.ln_q", "attn.norm_added_q"), ("context_block.attn.ln_k", "attn.norm_added_k"),
                     ("x_block.attn2.ln_q", "attn2.norm_q"), ("x_block.attn2.ln_k", "attn2.norm_k")):
            if f"{b_}.{b}.weight" in sd:  # qk-norm (SD3.5)
                out[f"{j}.{a}.weight"] = sd.pop(f"{b_}.{b}.weight")
    assert not sd, f"unconverted weights: {sorted(sd)}"
    return {prefix + k: v.contiguous() for k, v in out.items()}


def write_single_file(path: str, model, keys: str = "original", dtype: torch.dtype | None = None,
                      extra: dict[str, torch.Tensor] | None = None) -> str:
    """``model`` saved as one .safetensors file with ``keys`` "original" (SAI) or "diffusers", its
    tensors stored in ``dtype`` (e.g. ``torch.float8_e4m3fn``), plus ``extra`` tensors (the text
    encoders / VAE an all-in-one file carries)."""
    from safetensors.torch import save_file

    if keys == "original":
        sd = original_sd3_state_dict(model)
    else:
        sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    sd.update(extra or {})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(sd, path)
    return path


def write_hf_cache(cache: str, repo_id: str, folder: str, revision: str = "0123456789abcdef0123456789abcdef01234567",
                   ref: bool = True, drop: tuple[str, ...] = ()) -> str:
    """``folder`` stored as Hugging Face's cache does: each file a blob named by its hash, linked
    from ``snapshots/<revision>/``; ``refs/main`` names the revision. Files whose path starts with
    one of ``drop`` keep their link but lose their blob (an interrupted download). Returns the
    repo folder ``<cache>/models--org--name``."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", revision)
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    for root, _, files in os.walk(folder):
        for name in files:
            src = os.path.join(root, name)
            rel = os.path.relpath(src, folder)
            with open(src, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            blob = os.path.join(repo, "blobs", digest)
            if not rel.startswith(drop):
                shutil.copyfile(src, blob)
            link = os.path.join(snapshot, rel)
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    if ref:
        os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
        with open(os.path.join(repo, "refs", "main"), "w") as f:
            f.write(revision)
    return repo
