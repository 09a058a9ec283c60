"""The plan of an export: every graph to have (name, kind, shapes, the key that says when to
rebuild it) and the manifest to write, worked out from an :class:`ExportRequest` and the
checkpoints' configs and weights. Reads only; builds nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

import hybridstitch
from hybridstitch.denoiser import Bucket, TransformerSpec, check_pair
from hybridstitch.engine.manifest import (
    FORMAT_VERSION,
    Manifest,
    TensorInfo,
    fingerprint_weights,
    sha256_json,
)
from hybridstitch.errors import HybridStitchError
from hybridstitch.loading import read_json, transformer_dir
from hybridstitch.masks import tokens_for_ratio
from hybridstitch.plugins import OP_DOMAIN, OP_NAME, OP_VERSION

from .graphs import GraphShapes, io_shapes
from .onnx_steps import resolve_fp32_blocks
from .request import ONNX_FLOAT, ExportRequest, scheduler_config_of, text_tokens_of, vae_scale_factor_of


@dataclass
class GraphPlan:
    """One graph to have: its name (= its kind and checkpoint role: small | large), shapes, and the
    key that says when to rebuild it."""

    name: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    key: str

    @property
    def kind(self) -> str:
        return self.name

    @property
    def role(self) -> str:
        return self.name


@dataclass
class ExportPlan:
    request: ExportRequest
    manifest: Manifest  # the target manifest, graphs not filled in yet
    graphs: list[GraphPlan] = field(default_factory=list)
    folders: dict = field(default_factory=dict)  # role -> transformer dir


def _tensor_infos(entries, precision: str) -> list[TensorInfo]:
    out = []
    for name, shape, dtype in entries:
        # "float": the engine precision; "float32": always float32 (the timestep); else as named
        onnx_dtype = {"float": ONNX_FLOAT[precision], "float32": "float"}.get(dtype, dtype)
        out.append(TensorInfo(name=name, shape=list(shape), dtype=onnx_dtype))
    return out


def plan_export(req: ExportRequest) -> ExportPlan:
    """Check the request against the checkpoints and work out every graph and the manifest. Reads only."""
    folders = {"large": transformer_dir(req.large, "large"), "small": transformer_dir(req.small, "small")}
    configs = {role: read_json(os.path.join(d, "config.json")) for role, d in folders.items()}
    specs = {role: TransformerSpec.from_config(cfg) for role, cfg in configs.items()}
    check_pair(specs["large"], specs["small"])
    vae = req.vae_scale_factor or vae_scale_factor_of(req.large)
    p = specs["large"].patch_size
    mult = vae * p
    if req.height % mult or req.width % mult:
        raise HybridStitchError(
            f"height and width must be multiples of {mult} (VAE scale {vae} x patch {p}); got {req.height}x{req.width}"
        )
    lh, lw = req.height // vae, req.width // vae
    for role, spec in specs.items():
        limit = spec.pos_embed_max_size
        if limit is not None and (lh // p > limit or lw // p > limit):
            raise HybridStitchError(
                f"{req.height}x{req.width} is beyond the {role} transformer's positional embedding "
                f"({limit} patches per side): export at most {limit * p * vae}x{limit * p * vae}"
            )
    fp32_blocks = resolve_fp32_blocks(req.fp32_blocks, req.precision, specs["large"])
    text = req.text_tokens or text_tokens_of(req.large)
    shapes = GraphShapes(batch=req.batch, latent_height=lh, latent_width=lw, text_tokens=text)
    n = shapes.image_tokens(specs["large"])

    weights = {}
    for role in ("large", "small"):
        weights[role] = fingerprint_weights(folders[role])
    models = {
        role: dict(path=os.path.abspath(getattr(req, role)), transformer_dir=os.path.abspath(folders[role]),
                   weights=weights[role], config=configs[role])
        for role in ("large", "small")
    }
    backend_version = _backend_version(req.backend)
    import onnx
    import onnxscript

    manifest = Manifest(
        precision=req.precision, opset=req.opset, batch=req.batch,
        resolution=dict(height=req.height, width=req.width, latent_height=lh, latent_width=lw, vae_scale_factor=vae),
        tokens=dict(image=n, text=text), buckets=[], models=models,
        backend=dict(name=req.backend, version=backend_version),
        exporter=dict(torch=torch.__version__, onnx=onnx.__version__, onnxscript=onnxscript.__version__),
        op=dict(domain=OP_DOMAIN, name=OP_NAME, version=OP_VERSION),
        scheduler=scheduler_config_of(req.large), hybridstitch_version=hybridstitch.__version__,
        fp32_blocks=fp32_blocks,
    )
    # the batch is symbolic: the graphs do not depend on it (TensorRT profiles do, see tensorrt_build)
    common = dict(format_version=FORMAT_VERSION, op=manifest.op, resolution=manifest.resolution, text_tokens=text,
                  precision=req.precision, opset=req.opset, backend=req.backend)

    def graph(role):
        ins, outs = io_shapes(role, specs[role], shapes)
        parts = dict(common, kind=role, weights=weights[role]["sha256"], config=configs[role])
        if role == "large" and fp32_blocks:
            parts["fp32_blocks"] = fp32_blocks
        return GraphPlan(role, _tensor_infos(ins, req.precision), _tensor_infos(outs, req.precision), sha256_json(parts))

    plan = ExportPlan(req, manifest, folders=folders)
    plan.graphs += [graph("small"), graph("large")]
    # Buckets: the masked-token counts TensorRT builds a profile for; the graph itself takes any k.
    manifest.buckets = [Bucket(ratio=r, masked_tokens=tokens_for_ratio(r, n), graph="large") for r in req.buckets]
    return plan


def _backend_version(backend: str) -> str:
    if backend == "onnxruntime":
        import onnxruntime

        return onnxruntime.__version__
    try:
        import tensorrt

        return tensorrt.__version__
    except ImportError:  # CPU tests with a fake toolchain; each build records its own TensorRT version
        return "unknown"


CONFIG_FIELDS = ("precision", "fp32_blocks", "opset", "resolution", "tokens", "backend")


def config_mismatch(old: Manifest, new: Manifest) -> str | None:
    """Why an existing engine folder holds another configuration (None when compatible)."""
    for f in CONFIG_FIELDS:
        a, b = getattr(old, f), getattr(new, f)
        if f == "backend":
            a, b = a.get("name"), b.get("name")
        if a != b:
            return f"{f} {a} (this export: {b})"
    for role in ("large", "small"):
        a, b = old.models[role]["weights"]["sha256"], new.models[role]["weights"]["sha256"]
        if a != b or old.models[role]["config"] != new.models[role]["config"]:
            return f"the {role} weights differ from the ones the folder's engines were built from"
    return None


__all__ = ["CONFIG_FIELDS", "ExportPlan", "GraphPlan", "config_mismatch", "plan_export"]
