"""The memory budget of an engine set, before any build: ``hybridstitch-export ... --plan``.

Everything is counted at real size from configs alone -- the transformers are built on torch's
meta device (no weight is read or allocated), the text encoders and the VAE from their
``config.json`` -- so a user can plan SD3.5 Large before downloading it: a folder holding only
``transformer/config.json`` (and, for the encoders, ``model_index.json`` with the encoders'
configs) is enough.

Items, in bytes, each placed on the device or the host:

* ``weights_large`` / ``weights_small``: the engines' weights at the engine precision, the
  fp32 blocks (block 35 of SD3.5 Large in fp16) at 4 bytes. One copy of the large model: its
  engine serves every bucket and the full step (TensorRT profiles add no weight memory).
* ``kv_cache`` / ``kv_cache_spare``: one request's image-token K/V of every attention slot
  (``slots x 2 x B x H x N x D``) in the engine precision, and the second set the engines write
  into (an engine cannot alias an output onto an input, so the caches are double-buffered).
* ``activations``: the largest single forward's working memory -- the engines' own figure once
  they are built (TensorRT's ``get_device_memory_size_for_profile_v2``), an estimate before:
  with fused attention (the TensorRT plugin) about 8 activations of ``[B, N + T, width]`` per
  block in flight; with the standard-op attention (ONNX Runtime) also the attention scores and
  probabilities, ``2 x B x H x (N + T)^2`` in float32 (the softmax runs in float32).
* ``text_encoder`` / ``text_encoder_2`` / ``text_encoder_3`` (CLIP-L, CLIP-G, T5-XXL) and ``vae``:
  placed per ``encoders`` (``gpu``, ``cpu`` or ``none``), at the engine precision.
* ``runtime``: on a GPU the CUDA context, cuBLAS/cuDNN handles and TensorRT's runtime (about
  0.8 GB, the usual figure); on the host the Python process with torch and ONNX Runtime loaded.

:func:`plan_memory` returns a :class:`MemoryPlan` (a table, the total, whether it fits, and what
to change when it does not); :func:`memory_plan` the items as a dict (the GPU suite compares them
with what the torch path allocates).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

from hybridstitch.denoiser import TransformerSpec, check_pair
from hybridstitch.errors import HybridStitchError
from hybridstitch.loading import read_json, transformer_dir

GB = 1e9
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
PLACEMENTS = ("gpu", "cpu", "none")
# The CUDA context with cuBLAS / cuDNN handles and TensorRT's runtime: the usual figure on
# Ampere / Hopper with CUDA 12-13 (check with the GPU suite's memory part).
CUDA_RUNTIME_BYTES = int(0.8 * GB)
# The host process that runs ONNX Runtime engines: Python, torch, diffusers, onnxruntime loaded
# (measured here: 0.45-0.5 GB resident before any engine loads).
HOST_RUNTIME_BYTES = int(0.5 * GB)
# Activations in flight per block with fused attention: the block input and its residual, the
# normed input, Q/K/V, the attention output, the 4x-wide MLP hidden (counted as 4): about 8 widths.
ACTIVATION_WIDTHS = 8
ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass(frozen=True)
class PlanItem:
    name: str
    bytes: int
    where: str  # "gpu" | "cpu" | "none" (not loaded)
    detail: str


@dataclass
class MemoryPlan:
    """What an engine set holds, where, and whether it fits."""

    items: list[PlanItem]
    device: str  # "gpu" (TensorRT) or "cpu" (ONNX Runtime's CPU provider): where the engines run
    describe: str  # the configuration planned, in words
    notes: list[str] = field(default_factory=list)

    def total(self, where: str | None = None) -> int:
        where = where or self.device
        return sum(i.bytes for i in self.items if i.where == where)

    def fits(self, capacity_bytes: float) -> bool:
        return self.total() <= capacity_bytes

    def as_bytes(self) -> dict[str, int]:
        return {i.name: i.bytes for i in self.items}

    def render(self, capacity_gb: float | None = None) -> str:
        """A plain table: item, GB, where, detail; then the total on the engines' device."""
        rows = [f"memory plan: {self.describe}", f"{'item':16s} {'GB':>7s}  {'where':5s}  detail"]
        for i in self.items:
            rows.append(f"{i.name:16s} {i.bytes / GB:7.2f}  {i.where:5s}  {i.detail}")
        total = self.total() / GB
        where = "GPU" if self.device == "gpu" else "host (CPU provider)"
        line = f"total on the {where}: {total:.2f} GB"
        if self.device == "gpu" and self.total("cpu"):
            line += f" (and {self.total('cpu') / GB:.2f} GB of encoders on the host)"
        rows.append(line)
        if capacity_gb is not None:
            verdict = "fits" if self.fits(capacity_gb * GB) else "does NOT fit"
            rows.append(f"{verdict} {capacity_gb:g} GB ({capacity_gb - total:+.2f} GB headroom)")
        rows += [f"note: {n}" for n in self.notes]
        return "\n".join(rows)

    def advice(self, capacity_gb: float) -> str:
        """What to change, with what each change saves, when the plan does not fit."""
        over = (self.total() - capacity_gb * GB) / GB
        bytes_of = self.as_bytes()
        tips = []
        enc = sum(i.bytes for i in self.items if i.where == "gpu" and (i.name in ENCODERS or i.name == "vae"))
        if enc:
            tips.append(f"--encoders cpu (keeps the text encoders and VAE on the host: -{enc / GB:.1f} GB)")
        if "fp32" in self.describe:
            w = bytes_of.get("weights_large", 0) + bytes_of.get("weights_small", 0)
            tips.append(f"--precision fp16 or bf16 (halves the weights and caches: about -{w / 2 / GB:.1f} GB)")
        caches = bytes_of.get("kv_cache", 0) + bytes_of.get("kv_cache_spare", 0)
        if caches:
            tips.append(f"a smaller --height/--width (the KV caches, {caches / GB:.1f} GB, grow with the image "
                        "tokens; the activations faster)")
            tips.append("a smaller --batch (caches and activations scale with it; 2 = one image with guidance)")
        tips.append("a GPU with more memory (the buckets do not matter: one large engine serves them all)")
        return f"needs {self.total() / GB:.1f} GB, {over:.1f} GB over {capacity_gb:g} GB; change: " + "; ".join(tips)


# -- counting -----------------------------------------------------------------------------------------------


def _meta_transformer(config: dict):
    import torch
    from diffusers import SD3Transformer2DModel

    clean = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        return SD3Transformer2DModel.from_config(clean)


def transformer_parameters(config: dict) -> tuple[int, list[int]]:
    """(all parameters, per block) of an ``SD3Transformer2DModel`` config, built on the meta device."""
    model = _meta_transformer(config)
    total = sum(p.numel() for p in model.parameters())
    return total, [sum(p.numel() for p in b.parameters()) for b in model.transformer_blocks]


def full_config(config: dict) -> dict:
    """``config`` with diffusers' defaults filled in (a partial config names only what differs)."""
    return dict(_meta_transformer(config).config)


def component_parameters(folder: str, name: str, library_class: tuple[str, str]) -> int | None:
    """Parameters of a pipeline component (a text encoder, the VAE) from its ``config.json``, built on
    the meta device; None when the folder has no config for it."""
    import importlib

    import torch

    cfg_path = os.path.join(folder, name, "config.json")
    if not os.path.isfile(cfg_path):
        return None
    library, class_name = library_class
    if library not in ("transformers", "diffusers"):
        return None  # a component of another library (the testbed's): not an SD3 encoder
    cls = getattr(importlib.import_module(library), class_name, None)
    if cls is None:
        return None
    with torch.device("meta"):
        if library == "diffusers":
            model = cls.from_config({k: v for k, v in read_json(cfg_path).items() if not k.startswith("_")})
        else:
            config = cls.config_class.from_pretrained(os.path.join(folder, name), local_files_only=True)
            model = cls(config)
    return sum(p.numel() for p in model.parameters())


def kv_cache_bytes(spec: TransformerSpec, batch: int, image_tokens: int, precision: str) -> int:
    """One cache set: slots x (K, V) x [B, H, N, D] in the engine precision."""
    return len(spec.attention_slots) * 2 * batch * spec.num_heads * image_tokens * spec.head_dim * BYTES[precision]


def activation_bytes(spec: TransformerSpec, batch: int, tokens: int, precision: str, fused_attention: bool,
                     fp32_blocks: bool) -> int:
    """The working memory of the largest forward (the large model's full step, k = N) -- an estimate."""
    width = spec.num_heads * spec.head_dim
    element = 4 if fp32_blocks else BYTES[precision]
    per_block = ACTIVATION_WIDTHS * batch * tokens * width * element
    if fused_attention:
        return per_block
    # scores and probabilities in float32, [B, H, N + T, N + T] each
    return per_block + 2 * batch * spec.num_heads * tokens * tokens * 4


def plan_memory(
    large_config: dict,
    small_config: dict,
    *,
    height: int,
    width: int,
    batch: int,
    text_tokens: int,
    precision: str,
    vae_scale_factor: int = 8,
    fp32_blocks: list[int] | tuple[int, ...] = (),
    backend: str = "tensorrt",
    attention: str = "plugin",
    encoders: dict[str, int] | None = None,
    encoder_placement: str = "gpu",
    describe: str = "",
) -> MemoryPlan:
    """The plan of an engine set of this pair and configuration (see the module docstring).

    ``encoders``: parameters of the pipeline's text encoders and VAE (``{"text_encoder": n, ...}``),
    or None when unknown. ``backend``: ``tensorrt`` (the engines on the GPU) or ``onnxruntime``
    (the CPU provider: everything on the host)."""
    if precision not in BYTES:
        raise HybridStitchError(f"precision must be one of {', '.join(BYTES)}, got {precision!r}")
    if encoder_placement not in PLACEMENTS:
        raise HybridStitchError(f"encoders must be one of {', '.join(PLACEMENTS)}, got {encoder_placement!r}")
    large_config, small_config = full_config(large_config), full_config(small_config)
    large = TransformerSpec.from_config(large_config)
    check_pair(large, TransformerSpec.from_config(small_config))
    p = large.patch_size
    lh, lw = height // vae_scale_factor, width // vae_scale_factor
    n = (lh // p) * (lw // p)
    device = "gpu" if backend == "tensorrt" else "cpu"
    element = BYTES[precision]
    items = []

    total_large, blocks = transformer_parameters(large_config)
    upcast = sum(blocks[i] for i in fp32_blocks if i < len(blocks)) if precision != "fp32" else 0
    items.append(PlanItem("weights_large", total_large * element + upcast * (4 - element), device,
                          f"{total_large / 1e9:.3f} B parameters at {precision}"
                          + (f", blocks {list(fp32_blocks)} in fp32" if upcast else "") + "; one copy for every step"))
    total_small, _ = transformer_parameters(small_config)
    items.append(PlanItem("weights_small", total_small * element, device,
                          f"{total_small / 1e9:.3f} B parameters at {precision}"))
    cache = kv_cache_bytes(large, batch, n, precision)
    shape = f"{len(large.attention_slots)} slots x K,V x [{batch}, {large.num_heads}, {n}, {large.head_dim}]"
    items.append(PlanItem("kv_cache", cache, device, f"one request: {shape}"))
    items.append(PlanItem("kv_cache_spare", cache, device, "the set the engines write into (double buffer)"))
    fused = backend == "tensorrt" and attention == "plugin"
    act = activation_bytes(large, batch, n + text_tokens, precision, fused, bool(upcast))
    items.append(PlanItem("activations", act, device,
                          ("estimate; fused attention (plugin)" if fused else
                           "estimate; attention scores materialised in float32") + f", {n} + {text_tokens} tokens"))
    notes = []
    if encoders is None:
        notes.append("text encoders / VAE: no configs in the large folder; not counted")
    else:
        where = {"gpu": device, "cpu": "cpu", "none": "none"}[encoder_placement]
        for name in (*ENCODERS, "vae"):
            count = encoders.get(name)
            if count is None:
                continue
            label = {"text_encoder": "CLIP-L", "text_encoder_2": "CLIP-G", "text_encoder_3": "T5"}.get(name, "VAE")
            items.append(PlanItem(name, count * element, where, f"{label}, {count / 1e9:.3f} B parameters at {precision}"))
    items.append(PlanItem("runtime", CUDA_RUNTIME_BYTES if device == "gpu" else HOST_RUNTIME_BYTES, device,
                          "CUDA context, cuBLAS/cuDNN, TensorRT runtime (typical)" if device == "gpu"
                          else "the Python process with torch and ONNX Runtime loaded"))
    if backend == "tensorrt" and attention == "standard":
        scores = 2 * batch * large.num_heads * (n + text_tokens) ** 2 * 4
        notes.append(f"--attention standard: if TensorRT does not fuse the attention, up to {scores / GB:.1f} GB more")
    return MemoryPlan(items, device, describe or f"{height}x{width}, batch {batch}, {precision}, {backend}", notes)


def memory_plan(large_config: dict, small_config: dict, *, height: int, width: int, batch: int, text_tokens: int,
                precision: str, buckets=(), **kw) -> dict[str, int]:
    """The plan's items in bytes (``{"weights_large": ..., "kv_cache": ..., ...}``); ``buckets`` do not
    change it (one engine, profiles without extra weight memory) and are accepted for the record."""
    return plan_memory(large_config, small_config, height=height, width=width, batch=batch, text_tokens=text_tokens,
                       precision=precision, **kw).as_bytes()


# -- from folders ---------------------------------------------------------------------------------------------


def pipeline_components(folder: str) -> dict[str, int] | None:
    """Parameters of the text encoders and VAE a diffusers pipeline folder names (configs only)."""
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        return None
    index = read_json(index_path)
    counts = {}
    for name in (*ENCODERS, "vae"):
        entry = index.get(name)
        if isinstance(entry, list) and len(entry) == 2 and entry[0] is not None:
            count = component_parameters(folder, name, (entry[0], entry[1]))
            if count is not None:
                counts[name] = count
    return counts or None


def plan_for_request(req, encoder_placement: str = "gpu") -> MemoryPlan:
    """The plan of an :class:`~hybridstitch.export.request.ExportRequest` (configs only: works on
    folders without weights)."""
    from .onnx_steps import resolve_fp32_blocks
    from .request import text_tokens_of, vae_scale_factor_of

    configs = {}
    for role in ("large", "small"):
        configs[role] = read_json(os.path.join(transformer_dir(getattr(req, role), role), "config.json"))
    spec = TransformerSpec.from_config(configs["large"])
    vae = req.vae_scale_factor or vae_scale_factor_of(req.large)
    text = req.text_tokens or text_tokens_of(req.large)
    blocks = resolve_fp32_blocks(req.fp32_blocks, req.precision, spec)
    attention = req.tensorrt.attention if req.tensorrt is not None else "standard"
    return plan_memory(
        configs["large"], configs["small"], height=req.height, width=req.width, batch=req.batch, text_tokens=text,
        precision=req.precision, vae_scale_factor=vae, fp32_blocks=blocks, backend=req.backend, attention=attention,
        encoders=pipeline_components(req.large), encoder_placement=encoder_placement,
        describe=(f"{os.path.basename(os.path.abspath(req.large))} + {os.path.basename(os.path.abspath(req.small))}, "
                  f"{req.height}x{req.width}, batch {req.batch} (CFG included), {req.precision}, {req.backend}, "
                  f"encoders on {encoder_placement}"),
    )


def check_fits(plan: MemoryPlan, capacity_gb: float) -> None:
    """Raise (with what to change) when ``plan`` does not fit ``capacity_gb``."""
    if not (capacity_gb > 0 and math.isfinite(capacity_gb)):
        raise HybridStitchError(f"--gpu-memory must be a positive number of GB, got {capacity_gb!r}")
    if not plan.fits(capacity_gb * GB):
        raise HybridStitchError("the engine set does not fit: " + plan.advice(capacity_gb))


def plan_dict(plan: MemoryPlan) -> dict:
    """JSON form of a plan (benchmarks write it)."""
    return dict(device=plan.device, describe=plan.describe, notes=plan.notes, total_bytes=plan.total(),
                items=[asdict(i) for i in plan.items])


__all__ = ["MemoryPlan", "PlanItem", "check_fits", "memory_plan", "plan_dict", "plan_for_request", "plan_memory"]
