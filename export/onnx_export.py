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
(weights, resolution, batch, text tokens, precision, fp32 blocks, opset) is refused unless ``overwrite``.

``backend="tensorrt"`` exports the same ONNX graphs (they stay in the folder as the reference),
checks each against the torch graph with ONNX Runtime, then builds one TensorRT engine per graph
for this GPU and TensorRT version (:mod:`.tensorrt_build`; ``--compiler torch-tensorrt``:
:mod:`.torch_tensorrt_build`).
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

from .tensorrt_build import TensorRTOptions
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
# Conv, LayerNorm and friends take bfloat16 only from opset 22 on.
BF16_MIN_OPSET = 22
# Above this many bytes of weights a graph is saved with external data (protobuf's 2 GB limit,
# with room for the graph itself).
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26
# SD3's text conditioning: 77 CLIP tokens + 256 T5 tokens (diffusers' max_sequence_length).
SD3_TEXT_TOKENS = 77 + 256

STRIPPED_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node", "pkg.torch.onnx.class_hierarchy")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ONNX_FLOAT = {"fp32": "float", "fp16": "float16", "bf16": "bfloat16"}


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
    # Large-model blocks run in float32 inside a fp16 graph (casts at the block's edges). None:
    # automatic -- block 35 of SD3.5 Large in fp16, as TensorRT's own SD3.5 demo; () for none.
    fp32_blocks: tuple[int, ...] | None = None
    tensorrt: TensorRTOptions | None = None  # backend="tensorrt" only; None: the defaults

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
        if self.precision == "bf16":
            if self.backend != "tensorrt":
                raise HybridStitchError(
                    "bf16 graphs are for --backend tensorrt only: ONNX Runtime's CPU provider has no bfloat16 kernels. "
                    "Export fp16 or fp32 for onnxruntime"
                )
            if self.opset < BF16_MIN_OPSET:
                raise HybridStitchError(
                    f"bf16 needs opset >= {BF16_MIN_OPSET} (Conv and LayerNormalization take bfloat16 from opset 22); "
                    f"got {self.opset}: pass --opset {BF16_MIN_OPSET}"
                )
        if self.fp32_blocks is not None:
            self.fp32_blocks = tuple(sorted({int(i) for i in self.fp32_blocks}))
            if any(i < 0 for i in self.fp32_blocks):
                raise HybridStitchError(f"fp32_blocks are block indices >= 0, got {list(self.fp32_blocks)}")
        if self.backend == "tensorrt":
            self.tensorrt = self.tensorrt or TensorRTOptions()
        elif self.tensorrt is not None:
            raise HybridStitchError(
                "TensorRT options (compiler, attention, builder optimisation level, hardware compatibility, timing "
                "cache, verify) apply to --backend tensorrt only"
            )


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


class UpcastBlock(torch.nn.Module):
    """One transformer block run in float32 inside a lower-precision model.

    Inputs are cast up and outputs back down at the block's edges, so an exported fp16 graph
    holds this block's weights and arithmetic in float32 (strongly typed TensorRT builds keep
    the ONNX types). This is what TensorRT's SD3.5 Large demo does to block 35, whose
    activations overflow fp16. The block's image-token K/V cache slots are cast too: the
    masked graph's cache inputs and outputs stay in the engine precision.
    """

    def __init__(self, block: torch.nn.Module, layer: int, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.output_dtype = next(block.parameters()).dtype
        self.compute_dtype = compute_dtype
        self.layer = layer
        self.context_pre_only = block.context_pre_only  # read by diffusers' transformer loop
        self.block = block.to(compute_dtype)

    def _cast_cache(self, stitch, dtype: torch.dtype) -> None:
        for slot in ((self.layer, "attn"), (self.layer, "attn2")):
            kv = stitch.cache.layers.get(slot)
            if kv is not None:
                stitch.cache.layers[slot] = (kv[0].to(dtype), kv[1].to(dtype))

    def forward(self, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs=None):
        stitch = (joint_attention_kwargs or {}).get("stitch")
        if stitch is not None and stitch.mode == "masked":
            self._cast_cache(stitch, self.compute_dtype)  # the op wants one float type
        up = lambda x: x.to(self.compute_dtype) if isinstance(x, torch.Tensor) else x  # noqa: E731
        out = self.block(
            hidden_states=up(hidden_states), encoder_hidden_states=up(encoder_hidden_states), temb=up(temb),
            joint_attention_kwargs=joint_attention_kwargs,
        )
        if stitch is not None:
            self._cast_cache(stitch, self.output_dtype)  # caches leave the block in the engine precision
        return tuple(o.to(self.output_dtype) if isinstance(o, torch.Tensor) else o for o in out)


# SD3.5 Large (38 blocks of 38 heads): TensorRT's demo/Diffusion upcasts transformer_blocks[35] in fp16.
SD35_LARGE_FP32_BLOCKS = (35,)


def resolve_fp32_blocks(requested: tuple[int, ...] | None, precision: str, spec: TransformerSpec) -> list[int]:
    """The large-model blocks to export in float32: ``requested``, or automatically block 35 of
    SD3.5 Large in fp16 (bf16 and fp32 have float32's range and need none)."""
    if precision == "fp32":
        return []  # the whole graph is float32 already
    if requested is None:
        sd35_large = spec.num_layers == 38 and spec.num_heads == 38
        return list(SD35_LARGE_FP32_BLOCKS) if precision == "fp16" and sd35_large else []
    bad = [i for i in requested if i >= spec.num_layers]
    if bad:
        raise HybridStitchError(
            f"fp32 blocks {bad} do not exist: the large transformer has {spec.num_layers} blocks "
            f"(0..{spec.num_layers - 1})"
        )
    return list(requested)


class DenoiserFromCheckpoint:
    """A diffusers folder -> :class:`TorchDenoiser` in the engine precision (loaded on first call),
    with ``fp32_blocks`` wrapped in :class:`UpcastBlock`."""

    def __init__(self, folder: str, role: str, dtype: torch.dtype, fp32_blocks=()):
        self.folder, self.role, self.dtype = folder, role, dtype
        self.fp32_blocks = tuple(fp32_blocks)
        self._denoiser = None

    def __call__(self):
        if self._denoiser is None:
            from hybridstitch.engine.torch_backend import TorchDenoiser
            from hybridstitch.loading import load_transformer

            # .to(): diffusers 0.42 may leave a checkpoint in its stored dtype despite torch_dtype
            model = load_transformer(self.folder, self.role, self.dtype)
            if next(model.parameters()).dtype != self.dtype:
                model = model.to(self.dtype)
            self._denoiser = TorchDenoiser(model, self.role)  # installs the stitch processors first
            for i in self.fp32_blocks:
                model.transformer_blocks[i] = UpcastBlock(model.transformer_blocks[i], i)
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
        permutations_to_transpose(model)
        attach_function(model)
        return model


def _permutation(equation: str) -> list[int] | None:
    """``"nhwpqc->nchpwq"`` -> ``[0, 5, 1, 3, 2, 4]``; None when the equation is not a pure permutation."""
    if equation.count("->") != 1 or "," in equation or "." in equation:
        return None
    src, dst = (side.strip() for side in equation.split("->"))
    if len(set(src)) != len(src) or sorted(src) != sorted(dst):
        return None
    return [src.index(c) for c in dst]


def permutations_to_transpose(model) -> int:
    """Replace every one-input ``Einsum`` that only permutes axes (diffusers' unpatchify
    ``nhwpqc->nchpwq``) by the equivalent ``Transpose``, in place; returns how many.

    Same values bit for bit, and ONNX's Einsum has no bfloat16 type (a bf16 graph with one fails
    the checker); TensorRT also runs a Transpose as a plain shuffle."""
    import onnx_ir as ir

    replaced = 0
    for node in list(model.graph):
        if node.op_type != "Einsum" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 1:
            continue
        attr = node.attributes.get("equation")
        perm = _permutation(attr.value) if attr is not None else None
        if perm is None:
            continue
        transpose = ir.Node("", "Transpose", inputs=[node.inputs[0]], attributes=[ir.AttrInt64s("perm", perm)],
                            name=f"{node.name}_transpose" if node.name else None)
        transpose.metadata_props.update(node.metadata_props)
        ir.convenience.replace_nodes_and_values(model.graph, node, [node], [transpose], node.outputs, transpose.outputs)
        replaced += 1
    return replaced


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
        _require_tensorrt(req)
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
    common = dict(format_version=FORMAT_VERSION, op=manifest.op, shapes=vars(shapes), precision=req.precision,
                  opset=req.opset, backend=req.backend)

    def graph(name, kind, role, k=None, ratio=None):
        ins, outs = io_shapes(kind, specs[role], shapes, k)
        parts = dict(common, kind=kind, masked_tokens=k, weights=weights[role]["sha256"], config=configs[role])
        if role == "large" and fp32_blocks:  # only when set: keys of earlier exports stay valid
            parts["fp32_blocks"] = fp32_blocks
        key = sha256_json(parts)
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
    try:
        import tensorrt

        return tensorrt.__version__
    except ImportError:  # CPU tests with a fake toolchain; each build records its own TensorRT version
        return "unknown"


def _require_tensorrt(req: ExportRequest) -> None:
    """Refuse a TensorRT export before anything is written when this machine cannot build engines.

    A module-level hook: CPU tests replace it to drive the TensorRT export with a fake toolchain.
    """
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        raise HybridStitchError(
            "TensorRT is not installed: pip install hybridstitch[gpu] (tensorrt >= 10.8, polygraphy) on a machine "
            "with an NVIDIA GPU, or export with --backend onnxruntime"
        )
    needed = {"onnx": ("polygraphy", "polygraphy"), "torch-tensorrt": ("torch_tensorrt", "torch-tensorrt")}
    module, package = needed[req.tensorrt.compiler]
    if importlib.util.find_spec(module) is None:
        raise HybridStitchError(f"--compiler {req.tensorrt.compiler} needs {package}: pip install {package}")
    if not torch.cuda.is_available():
        raise HybridStitchError(
            "TensorRT builds engines for the GPU it runs on, and torch sees no CUDA device here; run the export on "
            "the GPU machine that will serve the engines (with a CUDA build of torch)"
        )


CONFIG_FIELDS = ("precision", "fp32_blocks", "opset", "batch", "resolution", "tokens", "backend")


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


def export_engines(req: ExportRequest, out: str, progress: bool = True, toolchain=None) -> Manifest:
    """Build (or finish building) the engines of ``req`` in ``out``; returns the manifest written.

    Raises HybridStitchError for bad requests and for folders holding other engines, before
    anything is written. ``toolchain`` (TensorRT exports only): what builds and inspects engines,
    :class:`~.tensorrt_build.TensorRTToolchain` by default.
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
        if req.backend == "tensorrt":
            manifest.tensorrt = old.tensorrt  # engine builds of other GPUs / options stay listed
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

    blocks = {"large": manifest.fp32_blocks, "small": []}
    loaders = {role: DenoiserFromCheckpoint(getattr(req, role), role, DTYPES[req.precision], blocks[role])
               for role in ("large", "small")}
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
    if req.backend == "tensorrt":
        from .tensorrt_build import build_engines

        build_engines(plan, out, loaders, progress=progress, toolchain=toolchain)
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
    "BF16_MIN_OPSET",
    "DEFAULT_BUCKETS",
    "DenoiserFromCheckpoint",
    "ExportRequest",
    "FilesFromOnnx",
    "OnnxFromGraph",
    "export_engines",
    "permutations_to_transpose",
    "plan_export",
    "resolve_fp32_blocks",
    "UpcastBlock",
]
