"""Export a large/small pair to ONNX engines: the full small, the full large with its KV cache,
one masked large per bucket, and the manifest.

Build steps are small callables named for what they turn into what (as Polygraphy's loaders),
so they compose and run only when called:

    DenoiserFromCheckpoint(folder, role, dtype)()          -> TorchDenoiser
    OnnxFromGraph(module, inputs, outputs, example, opset)() -> onnx_ir.Model (custom node + function)
    FilesFromOnnx(model, folder, name, threshold)()          -> [{name, size, sha256}] written atomically

:func:`export_engines` drives them graph by graph with a progress bar per graph. Resuming:
each graph's manifest entry records a key (sha256 of everything it was built from) and its
files' sizes and hashes; a rerun skips every graph whose key matches and whose files are intact,
so an interrupted export picks up where it stopped. Files are written into a temporary folder
inside the engine folder and renamed into place only once complete, and the manifest is
rewritten (atomically) after each graph, so a failure at any point leaves the earlier engines
and the earlier manifest as they were. A folder holding engines of another configuration
(weights, resolution, batch, text tokens, precision, opset) is refused unless ``overwrite``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

import hybridstitch
from hybridstitch.denoiser import TransformerSpec
from hybridstitch.errors import HybridStitchError
from hybridstitch.loading import read_json, transformer_dir
from hybridstitch.masks import tokens_for_ratio
from hybridstitch.plugins import OP_DOMAIN, OP_NAME, OP_VERSION

from .graphs import FullGraph, FullLargeGraph, GraphShapes, MaskedLargeGraph, example_inputs, io_shapes
from .manifest import (
    FORMAT_VERSION,
    PRECISIONS,
    GraphEntry,
    Manifest,
    TensorInfo,
    bucket_graph_name,
    fingerprint_weights,
    read_manifest,
    sha256_file,
    sha256_json,
    utc_now,
)


BACKENDS = ("onnxruntime", "tensorrt")
DEFAULT_BUCKETS = (0.1, 0.2, 0.3, 0.4)
DEFAULT_OPSET = 18
# Above this many bytes of weights a graph is saved with external data (protobuf's 2 GB limit,
# with room for the graph itself).
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26
# SD3's text conditioning: 77 CLIP tokens + 256 T5 tokens (diffusers' max_sequence_length).
SD3_TEXT_TOKENS = 77 + 256

STRIPPED_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node", "pkg.torch.onnx.class_hierarchy")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
ONNX_FLOAT = {"fp32": "float", "fp16": "float16"}


# -- the request -------------------------------------------------------------------------------------


@dataclass
class ExportRequest:
    """What ``hybridstitch-export`` builds. Height and width are in pixels; batch counts CFG."""

    large: str
    small: str
    height: int
    width: int
    batch: int = 2
    buckets: tuple[float, ...] = DEFAULT_BUCKETS
    precision: str = "fp32"
    backend: str = "onnxruntime"
    opset: int = DEFAULT_OPSET
    text_tokens: int | None = None  # None: from the large folder's conditioner (SD3: 333)
    vae_scale_factor: int | None = None  # None: from the large folder (SD3: 8; testbed: 1)
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD
    overwrite: bool = False

    def __post_init__(self) -> None:
        self.buckets = tuple(sorted({float(r) for r in self.buckets}))
        if self.backend not in BACKENDS:
            raise HybridStitchError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.precision not in PRECISIONS:
            raise HybridStitchError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.batch, int) or self.batch < 1:
            raise HybridStitchError(
                f"batch must be a positive integer (it counts the CFG doubling: 1 image with guidance is 2), got {self.batch!r}"
            )
        if self.height <= 0 or self.width <= 0:
            raise HybridStitchError(f"height and width must be positive, got {self.height}x{self.width}")
        for r in self.buckets:
            if not 0.0 < r <= 1.0:
                raise HybridStitchError(f"bucket ratios must be in (0, 1], got {r} in {list(self.buckets)}")
        names = [bucket_graph_name(r) for r in self.buckets]
        if len(set(names)) != len(names):
            raise HybridStitchError(f"bucket ratios {list(self.buckets)} are too close to tell apart (percent to 6 digits)")
        if self.opset < 18:
            raise HybridStitchError(f"opset must be >= 18 (the dynamo exporter's lowest), got {self.opset}")
        if self.text_tokens is not None and self.text_tokens < 1:
            raise HybridStitchError(f"text_tokens must be >= 1, got {self.text_tokens}")


def vae_scale_factor_of(folder: str) -> int:
    """Pixels per latent cell of the large folder's VAE: SD3's 8, the testbed's 1, 8 without a VAE."""
    index_path = os.path.join(folder, "model_index.json")
    if os.path.isfile(index_path) and "prompt_encoder" in read_json(index_path):
        return 1  # the testbed's identity VAE
    vae_cfg = os.path.join(folder, "vae", "config.json")
    if os.path.isfile(vae_cfg):
        return 2 ** (len(read_json(vae_cfg).get("block_out_channels", [0, 0, 0, 0])) - 1)
    return 8


def text_tokens_of(folder: str) -> int:
    """Text tokens of the large folder's conditioner: the testbed encoder's ``num_tokens``, else SD3's 333."""
    cfg = os.path.join(folder, "prompt_encoder", "config.json")
    if os.path.isfile(cfg):
        return int(read_json(cfg).get("num_tokens", 8))
    return SD3_TEXT_TOKENS


def scheduler_config_of(folder: str) -> dict | None:
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    return read_json(path) if os.path.isfile(path) else None


# -- build steps -----------------------------------------------------------------------------------


class DenoiserFromCheckpoint:
    """A diffusers folder -> :class:`TorchDenoiser` in the engine precision (loaded on first call)."""

    def __init__(self, folder: str, role: str, dtype: torch.dtype):
        self.folder, self.role, self.dtype = folder, role, dtype
        self._denoiser = None

    def __call__(self):
        if self._denoiser is None:
            from hybridstitch.engine.torch_backend import TorchDenoiser
            from hybridstitch.loading import load_transformer

            # .to(): diffusers 0.42 may leave a checkpoint in its stored dtype despite torch_dtype
            model = load_transformer(self.folder, self.role, self.dtype)
            if next(model.parameters()).dtype != self.dtype:
                model = model.to(self.dtype)
            self._denoiser = TorchDenoiser(model, self.role)
        return self._denoiser


class OnnxFromGraph:
    """An ``nn.Module`` graph -> ``onnx_ir.Model`` with the given input/output names.

    Traced under :func:`~hybridstitch.plugins.export_mode`, so each cached-KV attention becomes
    one ``hybridstitch::CachedKVAttention`` node; the op's local function is attached after the
    exporter's passes (see ``plugins/onnx_op.py`` for why).
    """

    def __init__(self, module: torch.nn.Module, input_names, output_names, example: tuple, opset: int):
        self.module, self.example, self.opset = module, example, opset
        self.input_names, self.output_names = list(input_names), list(output_names)

    def __call__(self):
        from hybridstitch.plugins import export_mode
        from hybridstitch.plugins.onnx_op import attach_function, custom_translation_table

        with export_mode(), torch.no_grad():
            program = torch.onnx.export(
                self.module.eval(), self.example, dynamo=True, opset_version=self.opset,
                custom_translation_table=custom_translation_table(), input_names=self.input_names,
                output_names=self.output_names, verbose=False, optimize=True,
            )
        model = program.model
        for node in model.graph.all_nodes():
            # the exporter's per-node debug records hold source paths and stack traces of this
            # machine: drop them (keep the module scope names, useful in profiles)
            for key in STRIPPED_METADATA:
                node.metadata_props.pop(key, None)
        attach_function(model)
        return model


class FilesFromOnnx:
    """``onnx_ir.Model`` -> ``folder/name.onnx`` (+ ``name.onnx.data`` when the weights exceed the
    threshold), written in a temporary folder and renamed into place; returns the file records."""

    def __init__(self, model, folder: str, name: str, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD):
        self.model, self.folder, self.name = model, folder, name
        self.threshold = external_data_threshold

    def weight_bytes(self) -> int:
        return sum(v.const_value.nbytes for v in self.model.graph.initializers.values() if v.const_value is not None)

    def __call__(self) -> tuple[list[dict], str | None]:
        import onnx_ir as ir

        onnx_name = f"{self.name}.onnx"
        data_name = f"{onnx_name}.data" if self.weight_bytes() > self.threshold else None
        tmp = tempfile.mkdtemp(dir=self.folder, prefix=f".tmp-{self.name}-")
        try:
            ir.save(self.model, os.path.join(tmp, onnx_name), external_data=data_name)
            names = [n for n in (data_name, onnx_name) if n]  # data first: the .onnx lands last
            records = []
            for n in names:
                path = os.path.join(tmp, n)
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
                records.append(dict(name=n, size=os.path.getsize(path), sha256=sha256_file(path)))
            for n in names:
                os.replace(os.path.join(tmp, n), os.path.join(self.folder, n))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return records[::-1], data_name  # .onnx first in the manifest


# -- planning ---------------------------------------------------------------------------------------


@dataclass
class GraphPlan:
    """One graph to have: its name, kind, shapes and the key that says when to rebuild it."""

    name: str
    kind: str  # small | large | masked
    role: str  # which checkpoint: small | large
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    key: str
    masked_tokens: int | None = None
    bucket_ratio: float | None = None


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
    from hybridstitch.pipeline import check_pair

    if req.backend == "tensorrt":
        _require_tensorrt()
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
    )
    common = dict(format_version=FORMAT_VERSION, op=manifest.op, shapes=vars(shapes), precision=req.precision,
                  opset=req.opset, backend=req.backend)

    def graph(name, kind, role, k=None, ratio=None):
        ins, outs = io_shapes(kind, specs[role], shapes, k)
        key = sha256_json(dict(common, kind=kind, masked_tokens=k, weights=weights[role]["sha256"], config=configs[role]))
        return GraphPlan(name, kind, role, _tensor_infos(ins, req.precision), _tensor_infos(outs, req.precision), key, k, ratio)

    plan = ExportPlan(req, manifest, folders=folders)
    plan.graphs.append(graph("small", "small", "small"))
    plan.graphs.append(graph("large", "large", "large"))
    for r in req.buckets:
        k = tokens_for_ratio(r, n)
        plan.graphs.append(graph(bucket_graph_name(r), "masked", "large", k, r))
        manifest.buckets.append(dict(ratio=r, masked_tokens=k, graph=bucket_graph_name(r)))
    return plan


def _backend_version(backend: str) -> str:
    if backend == "onnxruntime":
        import onnxruntime

        return onnxruntime.__version__
    return "unknown"


def _require_tensorrt() -> None:
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        raise HybridStitchError("TensorRT is not installed: pip install hybridstitch[gpu]")
    raise HybridStitchError(
        "--backend tensorrt is not available in this hybridstitch build yet; export with --backend onnxruntime"
    )


CONFIG_FIELDS = ("precision", "opset", "batch", "resolution", "tokens", "backend")


def _mismatch(old: Manifest, new: Manifest) -> str | None:
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


# -- the export -----------------------------------------------------------------------------------


def export_engines(req: ExportRequest, out: str, progress: bool = True) -> Manifest:
    """Build (or finish building) the engines of ``req`` in ``out``; returns the manifest written.

    Raises HybridStitchError for bad requests and for folders holding other engines, before
    anything is written.
    """
    plan = plan_export(req)
    manifest = plan.manifest
    old = None
    if os.path.isdir(out) and os.path.isfile(os.path.join(out, "manifest.json")):
        try:
            old = read_manifest(out)
        except HybridStitchError as e:
            if not req.overwrite:
                raise HybridStitchError(f"{e}. To replace that folder's contents, pass --overwrite") from e
        if old is not None and (why := _mismatch(old, manifest)) is not None:
            if not req.overwrite:
                raise HybridStitchError(
                    f"{out} holds engines of another configuration: {why}. Export into another folder (--out), "
                    "or pass --overwrite to rebuild this one"
                )
            old = None
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):  # temporary files of an export that was killed mid-write
        if name.startswith(".tmp-"):
            path = os.path.join(out, name)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.unlink(path)

    if old is not None:
        manifest.created, manifest.updated = old.created, old.updated
        # Buckets built before and not asked for now stay: adding a bucket never drops work.
        asked = {b["graph"] for b in manifest.buckets}
        for b in old.buckets:
            entry = old.graphs.get(b["graph"])
            if b["graph"] not in asked and entry is not None and entry.check_files(out, hash_files=False) is None:
                manifest.buckets.append(b)
                manifest.graphs[b["graph"]] = entry
        manifest.buckets.sort(key=lambda b: b["ratio"])
    else:
        manifest.created = utc_now()

    loaders = {role: DenoiserFromCheckpoint(getattr(req, role), role, DTYPES[req.precision]) for role in ("large", "small")}
    for g in plan.graphs:
        previous = old.graphs.get(g.name) if old is not None else None
        bar = tqdm(total=4, desc=f"{g.name}", unit="step", disable=not progress, leave=True)
        try:
            if previous is not None and previous.key == g.key and previous.check_files(out) is None:
                manifest.graphs[g.name] = previous
                bar.set_postfix_str("up to date")
                bar.update(4)
                continue
            manifest.graphs[g.name] = _build_graph(g, plan, loaders[g.role], out, bar)
            manifest.updated = utc_now()
            manifest.complete = False
            manifest.save(out)  # progress survives an interruption
        finally:
            bar.close()
    manifest.complete = True
    manifest.updated = manifest.updated or utc_now()
    if old is None or old.to_dict() != manifest.to_dict():  # an up-to-date rerun writes nothing
        manifest.save(out)
    return manifest


def _build_graph(g: GraphPlan, plan: ExportPlan, load: Callable, out: str, bar) -> GraphEntry:
    req = plan.request
    bar.set_postfix_str("load")
    denoiser = load()
    bar.update(1)
    module = {"small": FullGraph, "large": FullLargeGraph, "masked": MaskedLargeGraph}[g.kind](denoiser)
    shapes = GraphShapes(req.batch, *plan.manifest.latent_size, plan.manifest.tokens["text"])
    example = example_inputs(g.kind, denoiser.spec, shapes, DTYPES[req.precision], g.masked_tokens)
    bar.set_postfix_str("export")
    model = OnnxFromGraph(module, [t.name for t in g.inputs], [t.name for t in g.outputs], example, req.opset)()
    _check_io(model, g)
    bar.update(1)
    bar.set_postfix_str("save")
    files, data_name = FilesFromOnnx(model, out, g.name, req.external_data_threshold)()
    bar.update(1)
    from hybridstitch.plugins.onnx_op import count_nodes

    entry = GraphEntry(
        kind=g.kind, file=f"{g.name}.onnx", key=g.key, inputs=g.inputs, outputs=g.outputs, files=files,
        external_data=data_name, masked_tokens=g.masked_tokens, bucket_ratio=g.bucket_ratio,
        custom_nodes=count_nodes(model), built=utc_now(),
    )
    bar.set_postfix_str("done")
    bar.update(1)
    return entry


def _check_io(model, g: GraphPlan) -> None:
    """The exported graph has exactly the planned names, shapes and dtypes (an internal invariant)."""
    got_in = [(v.name, [int(d) for d in v.shape], v.dtype.name.lower()) for v in model.graph.inputs]
    got_out = [(v.name, [int(d) for d in v.shape], v.dtype.name.lower()) for v in model.graph.outputs]
    want_in = [(t.name, t.shape, t.dtype) for t in g.inputs]
    want_out = [(t.name, t.shape, t.dtype) for t in g.outputs]
    assert got_in == want_in, f"{g.name}: exported inputs {got_in} != planned {want_in}"
    assert got_out == want_out, f"{g.name}: exported outputs {got_out} != planned {want_out}"


__all__ = [
    "DEFAULT_BUCKETS",
    "DenoiserFromCheckpoint",
    "ExportRequest",
    "FilesFromOnnx",
    "OnnxFromGraph",
    "export_engines",
    "plan_export",
]
