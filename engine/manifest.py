"""The manifest beside the engines: what was built, from what, for which requests.

``manifest.json`` (format ``hybridstitch-engines``, version :data:`FORMAT_VERSION`)::

    {
      "format": "hybridstitch-engines", "format_version": 3,
      "checksum": "<sha256 of everything else in the file>",
      "created": "2025-01-01T00:00:00Z",   # first export into this folder
      "updated": "...",                      # last graph built
      "complete": true,                      # every graph listed below is built
      "hybridstitch_version": "0.1.0",
      "backend": {"name": "onnxruntime", "version": "1.32.0"},
      "exporter": {"torch": "2.13.0", "onnx": "1.23.2", "onnxscript": "0.7.2"},
      "op": {"domain": "hybridstitch", "name": "CachedKVAttention", "version": "1"},
      "precision": "fp32" | "fp16" | "bf16",   # bf16: TensorRT only (ONNX Runtime's CPU provider lacks bf16 kernels)
      "fp32_blocks": [],                     # large-model blocks exported in float32 inside a fp16 graph
      "opset": 18,
      "resolution": {"height": 768, "width": 768, "latent_height": 96, "latent_width": 96,
                     "vae_scale_factor": 8},
      "batch": 2,                            # CFG included (1 image with guidance = 2): the batch TensorRT
                                             # profiles are built for; the ONNX graphs take any batch
      "tokens": {"image": 2304, "text": 333},
      "buckets": [{"ratio": 0.1, "masked_tokens": 231, "graph": "large"}, ...],   # TensorRT's k profiles;
                                             # ONNX Runtime serves any k = ceil(r N) with the same graph
      "models": {"large": {"path": "/abs/large", "transformer_dir": "/abs/large/transformer",
                           "weights": {"sha256": "...", "files": [{"name", "size", "mtime_ns", "sha256"}]},
                           "config": {...diffusers transformer config...}},
                 "small": {...}},
      "scheduler": {...FlowMatchEulerDiscreteScheduler config...} | null,
      "graphs": {"small": {"kind": "small", "file": "small.onnx", "external_data": "small.onnx.data",
                           "files": [{"name", "size", "sha256"}], "key": "<sha256 of what it was built from>",
                           "inputs": [{"name", "shape", "dtype"}], "outputs": [...],   # shapes: ints, or the
                           "custom_nodes": 0 | n},                                     # symbols "batch" / "k"
                 "large": {...}},             # the one large graph: masked steps at any k, the full step at k = N
      "tensorrt": null | {...}               # TensorRT engines built from these graphs, per GPU and TensorRT
                                             # version: see hybridstitch.export.tensorrt_build
    }

Version 3 (this one) carries a checksum and is read against a schema (:mod:`.manifest_schema`).
Version 2 held the same fields without them; version 1 had a full large graph and one masked graph
per bucket, each with its own copy of the weights (version 2 on: one large graph with a symbolic
number of masked tokens serves every mask ratio and the full step). Dtypes are ONNX element-type names (``float``, ``float16``, ``int64``). The transformer
configs make the engines self-describing: a runtime builds its :class:`TransformerSpec` from
them without the checkpoints. Every write is atomic (:mod:`hybridstitch.fileio`).

The runtime (``hybridstitch.engine``) reads this module; the builder (``hybridstitch.export``)
writes through it. Reading is strict and reads only: an unknown format or version, a field of the
wrong type, range or shape (named by its path), a path that leaves the engine folder, a manifest
edited after export (its checksum: a changed scheduler ``shift`` would silently change every
image), a graph file that is missing, unreadable, truncated or altered, each raise
:class:`HybridStitchError` with the fix (re-export).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from hybridstitch.denoiser import Bucket, TransformerSpec
from hybridstitch.errors import HybridStitchError
from hybridstitch.fileio import atomic_write_text

from .integrity import Verifier, file_stat, inside_folder, sha256_file
from .manifest_schema import validate_manifest

FORMAT = "hybridstitch-engines"
FORMAT_VERSION = 3
# The symbolic dimensions of the graphs' shapes: the batch (CFG included) and the masked tokens k.
BATCH, MASKED = "batch", "k"
MANIFEST_NAME = "manifest.json"
PRECISIONS = ("fp32", "fp16", "bf16")
# Temporary files and folders an export writes in (and beside) an engine folder carry this prefix:
# a later export, holding the folder's lock, removes those left by one that was killed.
EXPORT_TMP_PREFIX = ".tmp-hybridstitch-export-"
MAX_MANIFEST_BYTES = 64 << 20  # a manifest is kilobytes; anything near this is not one


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()


def manifest_checksum(data: dict) -> str:
    """sha256 of a manifest's content as JSON (sorted keys, compact), its ``checksum`` field left out."""
    body = {k: v for k, v in data.items() if k != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sealed(data: dict) -> dict:
    """``data`` as written: JSON types only (tuples become lists) and its checksum added."""
    plain = json.loads(json.dumps({k: v for k, v in data.items() if k != "checksum"}))
    head = {k: plain[k] for k in ("format", "format_version") if k in plain}  # identity first, for readers
    return {**head, "checksum": manifest_checksum(plain), **plain}


def weight_files(transformer_dir: str) -> list[str]:
    """The files that hold a transformer: its config and every safetensors shard (and index)."""
    try:
        listed = os.listdir(transformer_dir)
    except OSError as e:
        raise HybridStitchError(f"cannot read the folder {transformer_dir} ({e.strerror or e})") from e
    names = sorted(n for n in listed if n.endswith(".safetensors") or n.endswith(".safetensors.index.json")
                   or n == "config.json")
    if not any(n.endswith(".safetensors") for n in names):
        raise HybridStitchError(
            f"no *.safetensors weights in {transformer_dir}; export needs diffusers safetensors checkpoints "
            "(save them with save_pretrained(..., safe_serialization=True))"
        )
    return names


def file_record(path: str, name: str | None = None) -> dict:
    """``{name, size, sha256, stat}`` of a file just written: what the integrity checks compare with."""
    stat = file_stat(path)
    return dict(name=name or os.path.basename(path), size=stat["size"], sha256=sha256_file(path), stat=stat)


def fingerprint_weights(transformer_dir: str) -> dict:
    """``{"sha256": <over the files' names and hashes>, "files": [{name, size, mtime_ns, sha256, stat}]}``."""
    files = []
    for name in weight_files(transformer_dir):
        path = os.path.join(transformer_dir, name)
        try:
            record = file_record(path, name)
        except OSError as e:
            raise HybridStitchError(f"cannot read {path} ({e.strerror or e}); check its permissions") from e
        files.append(dict(record, mtime_ns=record["stat"]["mtime_ns"]))
    return dict(sha256=sha256_json([(f["name"], f["sha256"]) for f in files]), files=files)


def weights_changed(transformer_dir: str, recorded: dict, verifier: Verifier | None = None) -> str | None:
    """Why the weights in ``transformer_dir`` differ from ``recorded`` (None when they match).

    A file is re-hashed only when its stat moved since it was hashed (see :mod:`.integrity`):
    a copy or a ``touch`` costs one hash and passes, any edit is caught. The files are only read.
    """
    try:
        names = weight_files(transformer_dir)
    except (OSError, HybridStitchError) as e:
        return str(e)
    if not isinstance(recorded, dict) or not isinstance(recorded.get("files"), list):
        return "the manifest's record of the weights is malformed"
    want = {f["name"]: f for f in recorded.get("files", [])}
    if set(names) != set(want):
        return f"files differ: now {names}, at export {sorted(want)}"
    verifier = verifier or Verifier()
    for name in names:
        rec = want[name]
        why = verifier.check(os.path.join(transformer_dir, name), rec["size"], rec["sha256"], rec.get("stat"), name=name)
        if why is not None:
            return why.replace("when built", "at export").replace("is corrupted", "has changed content")
    return None


def file_problem(folder: str, name: str, size: int, sha256: str, hash_files: bool = True, recorded_at: str = "export",
                 stat: dict | None = None, verifier: Verifier | None = None) -> str | None:
    """Why ``folder/name`` is not the file recorded (outside the folder, missing, unreadable, resized,
    other sha256), or None. Reads only, and hashes only a file whose stat moved since ``stat`` (or
    the folder's stamp)."""
    why = inside_folder(folder, name)
    if why is not None:
        return why
    return (verifier or Verifier()).check(os.path.join(folder, name), size, sha256, stat, hash_files, name=name,
                                          recorded_at=recorded_at)


@dataclass
class TensorInfo:
    name: str
    shape: list[int | str]  # a size, or the name of a symbolic dimension ("batch", "k")
    dtype: str  # ONNX element type name: float, float16, int64

    @classmethod
    def from_dict(cls, d: dict) -> "TensorInfo":
        return cls(name=d["name"], shape=[s if isinstance(s, str) else int(s) for s in d["shape"]], dtype=d["dtype"])

    def resolve(self, sizes: dict[str, int]) -> list[int]:
        """The shape with its symbolic dimensions replaced by ``sizes`` (e.g. ``{"batch": 2, "k": 5}``)."""
        return [sizes[d] if isinstance(d, str) else d for d in self.shape]


@dataclass
class GraphEntry:
    """One built graph and the files that hold it."""

    kind: str  # "small" | "large"
    file: str  # relative to the engine folder
    key: str  # sha256 of everything the graph was built from; a rerun rebuilds when it moves
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    files: list[dict] = field(default_factory=list)  # [{name, size, sha256}]: the .onnx and its external data
    external_data: str | None = None
    custom_nodes: int = 0  # CachedKVAttention nodes in the graph
    built: str = ""

    @classmethod
    def from_dict(cls, d: dict) -> "GraphEntry":
        d = dict(d)
        d["inputs"] = [TensorInfo.from_dict(t) for t in d["inputs"]]
        d["outputs"] = [TensorInfo.from_dict(t) for t in d["outputs"]]
        return cls(**d)

    def check_files(self, folder: str, hash_files: bool = True, verifier: Verifier | None = None) -> str | None:
        """Why this graph's files are not as built (None when they are). Reads only."""
        for rec in self.files:
            why = file_problem(folder, rec["name"], rec["size"], rec["sha256"], hash_files, recorded_at="export",
                               stat=rec.get("stat"), verifier=verifier)
            if why is not None:
                return why
        return None


@dataclass
class Manifest:
    precision: str
    opset: int
    batch: int
    resolution: dict  # height, width, latent_height, latent_width, vae_scale_factor
    tokens: dict  # image, text
    buckets: list[Bucket]  # ascending ratio; in the file: [{ratio, masked_tokens, graph}]
    models: dict  # large / small: {path, transformer_dir, weights, config}
    backend: dict  # {name, version}
    exporter: dict
    op: dict
    scheduler: dict | None = None
    graphs: dict[str, GraphEntry] = field(default_factory=dict)
    fp32_blocks: list[int] = field(default_factory=list)  # large-model blocks kept in float32 (fp16 overflow)
    tensorrt: dict | None = None  # engine builds: hybridstitch.export.tensorrt_build
    complete: bool = False
    created: str = ""
    updated: str = ""
    hybridstitch_version: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    # -- views -----------------------------------------------------------------------------

    def spec(self, role: str) -> TransformerSpec:
        return TransformerSpec.from_config(self.models[role]["config"])

    @property
    def latent_size(self) -> tuple[int, int]:
        return int(self.resolution["latent_height"]), int(self.resolution["latent_width"])

    def bucket_ratios(self) -> list[float]:
        return [b.ratio for b in self.buckets]

    def describe(self) -> str:
        r = self.resolution
        return (
            f"{r['height']}x{r['width']} (latent {r['latent_height']}x{r['latent_width']}), batch {self.batch} "
            f"(CFG included), {self.tokens['text']} text tokens, {self.precision}, buckets "
            f"{', '.join(f'{b:g}' for b in self.bucket_ratios()) or 'none'}"
        )

    # -- (de)serialisation ----------------------------------------------------------------------

    def to_dict(self) -> dict:
        d = asdict(self)
        # a stable, readable key order: identity first, graphs last
        order = ["format", "format_version", "created", "updated", "complete", "hybridstitch_version", "backend",
                 "exporter", "op", "precision", "fp32_blocks", "opset", "resolution", "batch", "tokens", "buckets",
                 "models", "scheduler", "graphs", "tensorrt"]
        return {k: d[k] for k in order}

    def save(self, folder: str) -> None:
        """Write ``manifest.json`` atomically, with the checksum of its content."""
        atomic_write_text(os.path.join(folder, MANIFEST_NAME), json.dumps(sealed(self.to_dict()), indent=2) + "\n",
                          prefix=EXPORT_TMP_PREFIX)

    @classmethod
    def from_dict(cls, d: dict, where: str = "manifest") -> "Manifest":
        """The manifest ``d`` (parsed JSON), refused with the field to fix unless it is one an export
        wrote: format and version, the schema, then the checksum."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise HybridStitchError(
                f"{where} is not a hybridstitch engine manifest (format {d.get('format') if isinstance(d, dict) else None!r}, "
                f"expected {FORMAT!r}); point at a folder written by hybridstitch-export"
            )
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise HybridStitchError(
                f"{where} has manifest format version {version!r}; this hybridstitch reads version {FORMAT_VERSION}. "
                "Re-export the engines with this hybridstitch version (hybridstitch-export ... --out DIR), or use the "
                "hybridstitch version that wrote them"
            )
        fix = ("Re-export the engines (hybridstitch-export ... --out DIR; --overwrite replaces the folder): a "
               "manifest is written by the export and read as written")
        problems = validate_manifest(d)
        if problems:
            shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
            raise HybridStitchError(f"{where} is not a valid engine manifest: {shown}. {fix}")
        if d["checksum"] != manifest_checksum(d):
            raise HybridStitchError(
                f"{where} was changed after export: its checksum does not match its content (an edited field, "
                f"e.g. the scheduler's shift, would silently change the images). {fix}"
            )
        d = {k: v for k, v in d.items() if k != "checksum"}
        d["graphs"] = {name: GraphEntry.from_dict(g) for name, g in d["graphs"].items()}
        d["buckets"] = [Bucket(ratio=float(b["ratio"]), masked_tokens=b["masked_tokens"], graph=b["graph"])
                        for b in d["buckets"]]
        d["fp32_blocks"] = list(d["fp32_blocks"])
        return cls(**d)


def read_manifest(folder: str) -> Manifest:
    """The manifest of an engine folder; every problem is a HybridStitchError that says what to do."""
    if not os.path.isdir(folder):
        raise HybridStitchError(f"engine folder {folder!r} does not exist; build it with hybridstitch-export --out {folder}")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise HybridStitchError(f"cannot read the engine folder {folder} (permission denied); check its permissions")
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise HybridStitchError(
            f"no {MANIFEST_NAME} in {folder}: not an engine folder, or its export never finished a graph; "
            f"run hybridstitch-export --out {folder}"
        )
    try:
        if os.path.getsize(path) > MAX_MANIFEST_BYTES:
            raise ValueError(f"{os.path.getsize(path)} bytes is no engine manifest")
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
        raise HybridStitchError(
            f"could not read {path} ({why}); check its permissions, or re-export the engines "
            f"(hybridstitch-export --out {folder})"
        ) from e
    return Manifest.from_dict(data, where=path)
