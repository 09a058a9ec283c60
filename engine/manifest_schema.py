"""The schema of ``manifest.json`` (format version 3), checked with pydantic before anything reads it.

:func:`validate_manifest` takes the parsed JSON and returns None or the problems, each named by its
field path (``graphs.large.files[0].sha256: ...``), so a damaged or hand-edited manifest is refused
with the field to look at instead of a ``KeyError`` deep in a loader. Three layers:

1. types and ranges of every field the runtime reads (pydantic models, strict: ``"18"`` is not an
   opset, ``true`` is not a batch, NaN is not a ratio);
2. paths: every file a loader opens is named relative to the engine folder and cannot leave it (a
   graph is a plain file name; a TensorRT engine a relative path without ``..``), and a graph's
   ``files`` (what is hashed) are exactly its ``file`` and ``external_data`` (what is loaded);
3. agreement between fields: the latent size and the resolution, the image tokens and the large
   model's patch, each bucket's k and its ratio, the graphs' dtypes and the backend.

The checksum over the whole manifest (:func:`hybridstitch.engine.manifest.manifest_checksum`)
then catches any edit these checks let through (a changed scheduler ``shift`` is a valid number).
"""

from __future__ import annotations

import math
import posixpath
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

# ONNX element-type names the graphs use; ONNX Runtime's CPU provider has no bfloat16 kernels.
GRAPH_DTYPES = {"onnxruntime": ("float", "float16", "int64"),
                "tensorrt": ("float", "float16", "bfloat16", "int64", "int32")}
FLOAT_DTYPES = {"fp32": "float", "fp16": "float16", "bf16": "bfloat16"}
# Every ONNX opset the dynamo exporter writes (hybridstitch.export.request bounds the export's).
MIN_OPSET, MAX_OPSET = 18, 64


def _plain_name(name: str) -> str:
    """A file directly in the engine folder: no folder part, no parent, nothing absolute."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(f"must be a plain file name inside the engine folder, got {name!r}")
    return name


def _relative_path(path: str) -> str:
    """A path below the engine folder, written with ``/``: no ``..``, nothing absolute."""
    parts = path.split("/")
    if (not path or path.startswith("/") or "\\" in path or "\0" in path or ":" in parts[0]
            or any(p in ("", ".", "..") for p in parts) or posixpath.normpath(path) != path):
        raise ValueError(f"must be a relative path inside the engine folder (no '..', not absolute), got {path!r}")
    return path


FileName = Annotated[str, AfterValidator(_plain_name)]
RelPath = Annotated[str, AfterValidator(_relative_path)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Count = Annotated[int, Field(ge=1)]
Size = Annotated[int, Field(ge=0)]
Ratio = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
Number = Annotated[float, Field(allow_inf_nan=False)]


class Record(BaseModel):
    """Our own records: every field typed, nothing unknown."""

    model_config = ConfigDict(strict=True, extra="forbid")


class Open(BaseModel):
    """Records of other libraries (diffusers configs): the fields read are typed, others kept."""

    model_config = ConfigDict(strict=True, extra="allow")


class Stat(Record):
    size: Size
    mtime_ns: int
    ctime_ns: int
    ino: int
    dev: int


class FileEntry(Record):
    name: FileName
    size: Size
    sha256: Sha256
    stat: Stat | None = None


class WeightFile(FileEntry):
    mtime_ns: int


class Weights(Record):
    sha256: Sha256
    files: Annotated[list[WeightFile], Field(min_length=1)]


class TransformerConfig(Open):
    """What :meth:`hybridstitch.denoiser.TransformerSpec.from_config` reads of a diffusers config."""

    in_channels: Count
    out_channels: Count | None = None
    patch_size: Count
    num_layers: Count
    num_attention_heads: Count
    attention_head_dim: Count
    joint_attention_dim: Count
    pooled_projection_dim: Count
    pos_embed_max_size: Count | None = None
    dual_attention_layers: list[Annotated[int, Field(ge=0)]] = []
    qk_norm: str | None = None


class Model(Record):
    path: str
    transformer_dir: str
    weights: Weights
    config: TransformerConfig


class Models(Record):
    large: Model
    small: Model


class SchedulerConfig(Open):
    """FlowMatchEulerDiscreteScheduler's settings that change the sigmas (and so every image)."""

    num_train_timesteps: Count = 1000
    shift: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] = 3.0
    use_dynamic_shifting: bool = False
    base_shift: Number | None = None
    max_shift: Number | None = None
    base_image_seq_len: Count | None = None
    max_image_seq_len: Count | None = None
    invert_sigmas: bool = False
    shift_terminal: Annotated[float, Field(gt=0.0, lt=1.0, allow_inf_nan=False)] | None = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    time_shift_type: Literal["exponential", "linear"] = "exponential"
    stochastic_sampling: bool = False


class Tensor(Record):
    name: Annotated[str, Field(min_length=1)]
    shape: list[Union[Size, Literal["batch", "k"]]]
    dtype: Literal["float", "float16", "bfloat16", "int64", "int32"]


class Graph(Record):
    kind: Literal["small", "large"]
    file: FileName
    key: Sha256
    inputs: Annotated[list[Tensor], Field(min_length=1)]
    outputs: Annotated[list[Tensor], Field(min_length=1)]
    files: Annotated[list[FileEntry], Field(min_length=1)]
    external_data: FileName | None = None
    custom_nodes: Size = 0
    built: str = ""


class Graphs(Record):
    """An export saves the manifest after each graph: until it completes, some may be missing."""

    small: Graph | None = None
    large: Graph | None = None


class BucketEntry(Record):
    ratio: Ratio
    masked_tokens: Count
    graph: Literal["large"]


class Resolution(Record):
    height: Count
    width: Count
    latent_height: Count
    latent_width: Count
    vae_scale_factor: Count


class Tokens(Record):
    image: Count
    text: Count


class Backend(Record):
    name: Literal["onnxruntime", "tensorrt"]
    version: str


class Op(Record):
    domain: str
    name: str
    version: str


class Plugin(Open):
    id: str
    implementation: str
    ptx_target: str | None = None
    ptx_version: str | None = None


class Engine(Record):
    file: RelPath
    size: Size
    sha256: Sha256
    stat: Stat | None = None
    key: str
    onnx_sha256: Sha256
    profiles: list[dict[str, Union[int, list[int]]]]
    io_names: dict[str, str]
    built: str = ""


class Build(Record):
    dir: RelPath
    compiler: Literal["onnx", "torch-tensorrt"]
    attention: Literal["plugin", "standard"]
    gpu: str
    compute_capability: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=2, max_length=2)]
    tensorrt_version: str
    hardware_compatibility: Literal["none", "ampere_plus", "same_compute_capability"]
    builder_optimization_level: Annotated[int, Field(ge=0, le=5)] | None = None
    strongly_typed: bool = True
    precision: Literal["fp32", "fp16", "bf16"]
    fp32_blocks: list[Annotated[int, Field(ge=0)]] = []
    plugin: Plugin | None = None
    python_plugins: list[str] = []
    timing_cache: str | None = None
    complete: bool
    created: str = ""
    updated: str = ""
    engines: dict[str, Engine]


class Verified(Record):
    onnx_sha256: Sha256
    result: str
    checked: str = ""


class TensorRTSection(Record):
    builds: dict[str, Build] = {}
    verified: dict[str, Verified] = {}


class ManifestSchema(Record):
    format: Literal["hybridstitch-engines"]
    format_version: int
    checksum: Sha256
    created: str
    updated: str
    complete: bool
    hybridstitch_version: str
    backend: Backend
    exporter: dict[str, str]
    op: Op
    precision: Literal["fp32", "fp16", "bf16"]
    fp32_blocks: list[Annotated[int, Field(ge=0)]]
    opset: Annotated[int, Field(ge=MIN_OPSET, le=MAX_OPSET)]
    resolution: Resolution
    batch: Count
    tokens: Tokens
    buckets: list[BucketEntry]
    models: Models
    scheduler: SchedulerConfig | None
    graphs: Graphs
    tensorrt: TensorRTSection | None


# -- agreement between fields ------------------------------------------------------------------------


def _agreement(m: ManifestSchema) -> list[str]:
    """What the fields say against each other (each problem as ``path: what``)."""
    problems = []
    r = m.resolution
    for side in ("height", "width"):
        if getattr(r, side) != getattr(r, f"latent_{side}") * r.vae_scale_factor:
            problems.append(f"resolution.{side}: {getattr(r, side)} is not latent_{side} {getattr(r, f'latent_{side}')} "
                            f"x vae_scale_factor {r.vae_scale_factor}")
    large = m.models.large.config
    p = large.patch_size
    if r.latent_height % p or r.latent_width % p:
        problems.append(f"resolution: latent {r.latent_height}x{r.latent_width} is not a multiple of the patch size {p}")
    elif m.tokens.image != (r.latent_height // p) * (r.latent_width // p):
        problems.append(f"tokens.image: {m.tokens.image}, but a {r.latent_height}x{r.latent_width} latent in "
                        f"{p}x{p} patches has {(r.latent_height // p) * (r.latent_width // p)}")
    ratios = [b.ratio for b in m.buckets]
    if ratios != sorted(set(ratios)):
        problems.append(f"buckets: ratios {ratios} must be ascending and distinct")
    n = m.tokens.image
    for i, b in enumerate(m.buckets):
        want = max(1, min(n, math.ceil(b.ratio * n - 1e-9)))  # hybridstitch.masks.tokens_for_ratio
        if b.masked_tokens != want:
            problems.append(f"buckets[{i}].masked_tokens: {b.masked_tokens}, but ratio {b.ratio:g} of {n} tokens is {want}")
    layers = large.num_layers
    if any(i >= layers for i in m.fp32_blocks):
        problems.append(f"fp32_blocks: {m.fp32_blocks} names blocks beyond the large model's {layers}")
    if m.backend.name == "onnxruntime" and m.precision == "bf16":
        problems.append("precision: bf16 graphs are for TensorRT only (ONNX Runtime has no bfloat16 kernels)")
    allowed = set(GRAPH_DTYPES[m.backend.name])
    floats = {FLOAT_DTYPES[m.precision], "float"}  # float32 inputs (the timestep) stay float32
    for name in ("small", "large"):
        g: Graph | None = getattr(m.graphs, name)
        where = f"graphs.{name}"
        if g is None:
            if m.complete:
                problems.append(f"{where}: missing from a complete manifest")
            continue
        if g.kind != name:
            problems.append(f"{where}.kind: {g.kind!r}, expected {name!r}")
        if not g.file.endswith(".onnx"):
            problems.append(f"{where}.file: {g.file!r} is not an .onnx file")
        loaded = [g.file] + ([g.external_data] if g.external_data else [])
        if [f.name for f in g.files] != loaded:
            problems.append(f"{where}.files: {[f.name for f in g.files]} must be exactly the files loaded, {loaded} "
                            "(each is checked against its size and sha256 before it loads)")
        for kind in ("inputs", "outputs"):
            for i, t in enumerate(getattr(g, kind)):
                if t.dtype not in allowed or (t.dtype not in ("int64", "int32") and t.dtype not in floats):
                    problems.append(f"{where}.{kind}[{i}].dtype: {t.dtype!r} does not fit {m.precision} "
                                    f"{m.backend.name} graphs")
    return problems


# -- the entry point -----------------------------------------------------------------------------------


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after[_plain_name(), str]", "function-after[_relative_path(), str]"):
            continue
        elif isinstance(part, str) and (part.startswith("literal[") or part in ("int", "str", "list[int]")):
            continue  # which arm of a union failed: the message says it
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def validate_manifest(data: Any) -> list[str] | None:
    """The problems of a parsed manifest (``path: what``), or None when it is well formed."""
    try:
        m = ManifestSchema.model_validate(data)
    except ValidationError as e:
        seen, problems = set(), []
        for err in e.errors(include_url=False):
            line = f"{_path(err['loc'])}: {err['msg']}"
            if line not in seen:
                seen.add(line)
                problems.append(line)
        return problems
    return _agreement(m) or None


__all__ = ["FLOAT_DTYPES", "GRAPH_DTYPES", "MAX_OPSET", "MIN_OPSET", "validate_manifest"]
