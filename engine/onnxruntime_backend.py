"""The ONNX Runtime backend: exported engines behind the :class:`~hybridstitch.denoiser.Denoiser` interface.

    engines = load_engines("engines/", providers=None, num_threads=4)
    pipe = HybridStitchPipeline.from_engines("engines/")          # the same, wired into a pipeline

Everything checkable is checked when the engines load, before any request: the manifest (format,
version, backend, completeness), every graph file (size, and sha256 unless
``verify_files=False``), the source weights when their folder is still there (size and
mtime, re-hashing a file only when those moved), and each session's input/output names,
shapes and dtypes against the manifest. A request is checked against the manifest by
:meth:`validate_request` before the pipeline does any model work.

Runtime:

* Two ``InferenceSession`` objects, made once: the small graph and THE large graph, so the large
  weights are held once. The large graph takes any number of masked tokens k: a masked step
  runs it on ``ceil(r * N)`` tokens (exactly: no bucket rounds it up; the trace's
  ``bucket_ratio`` equals the mask ratio), the full step at k = N with every position.
* Both graphs take any batch (symbolic), so one engine set serves one image or eight.
* Every call runs through IO binding: torch inputs and outputs are bound by pointer (no
  numpy round trip), in the engine precision; fp16 engines get their inputs cast at the
  boundary and return outputs in the caller's dtype.
* The KV caches belong to the caller (:mod:`hybridstitch.kvcache`): torch tensors bound by
  pointer as inputs, and the updated caches written into new tensors (ONNX Runtime cannot alias
  an output onto an input), so a step holds two sets: the one it reads and the one it writes.
  The full step's cache inputs are a zeroed scratch set per batch size (every row is rewritten).

Providers: CPU by default. ``providers=["cuda"]`` or ``["tensorrt"]`` (or full names such as
``"CUDAExecutionProvider"``, optionally ``(name, options)`` pairs) need ``onnxruntime-gpu``;
they are checked when asked for, never required. Intra-op threads: ``num_threads``.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hybridstitch.denoiser import Bucket
from hybridstitch.kvcache import Caches
from hybridstitch.errors import HybridStitchError
from hybridstitch.masks import tokens_for_ratio
from hybridstitch.tokens import unpatchify

from .base import (
    EngineDenoiser,
    EngineLargeDenoiser,
    EngineSet,
    check_graph_files,
    check_source_weights,
    open_engine_folder,
)
from .integrity import Verifier
from .manifest import BATCH, MASKED

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
NUMPY_DTYPES = {"float": np.float32, "float16": np.float16, "int64": np.int64}
TORCH_DTYPES = {"float": torch.float32, "float16": torch.float16, "int64": torch.int64}
ORT_TYPES = {"float": "tensor(float)", "float16": "tensor(float16)", "int64": "tensor(int64)"}


def _ort():
    try:
        import onnxruntime
    except ImportError as e:  # pragma: no cover - onnxruntime is a core dependency
        raise HybridStitchError("onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu)") from e
    return onnxruntime


def resolve_providers(providers=None) -> list:
    """Execution providers by alias or full name, checked against this onnxruntime build; CPU last as fallback."""
    ort = _ort()
    if providers is None:
        providers = ["cpu"]
    if isinstance(providers, str):
        providers = [providers]
    available = ort.get_available_providers()
    out = []
    for p in providers:
        name, options = (p if isinstance(p, (tuple, list)) else (p, None))
        name = PROVIDER_ALIASES.get(str(name).lower(), name)
        if name not in available:
            hint = (
                "install onnxruntime-gpu (pip install hybridstitch[gpu]; it replaces the CPU-only onnxruntime wheel)"
                if name in GPU_PROVIDERS else f"use one of {', '.join(available)}"
            )
            raise HybridStitchError(
                f"execution provider {name} is not available in this onnxruntime build "
                f"({ort.__version__}: {', '.join(available)}); {hint}"
            )
        out.append((name, options) if options else name)
    names = [p[0] if isinstance(p, tuple) else p for p in out]
    if "CPUExecutionProvider" not in names:
        out.append("CPUExecutionProvider")
    return out


def provider_device(providers: list) -> torch.device:
    """Where the engines' inputs and outputs live: the GPU for CUDA / TensorRT, else the CPU."""
    first = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
    if first in GPU_PROVIDERS:
        options = providers[0][1] if isinstance(providers[0], tuple) else None
        return torch.device("cuda", int((options or {}).get("device_id", 0)))
    return torch.device("cpu")


def session_options(num_threads: int | None):
    ort = _ort()
    so = ort.SessionOptions()
    if num_threads is not None:
        if num_threads < 1:
            raise HybridStitchError(f"num_threads must be >= 1, got {num_threads}")
        so.intra_op_num_threads = int(num_threads)
        so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only: the custom domain's schema warnings are expected
    return so


# -- one graph ---------------------------------------------------------------------------------------


class OrtGraph:
    """One engine: an ``InferenceSession`` and its manifest entry, run through IO binding."""

    def __init__(self, name: str, entry, folder: str, providers: list, options, device: torch.device):
        ort = _ort()
        self.name, self.entry, self.device = name, entry, device
        path = os.path.join(folder, entry.file)
        try:
            self.session = ort.InferenceSession(path, options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise HybridStitchError(
                f"onnxruntime could not load the {name} engine {path}: {type(e).__name__}: {e}. The file may be "
                f"corrupted or from another onnxruntime; re-export it (hybridstitch-export ... --out {folder})"
            ) from e
        self._check_io()
        self.inputs = {t.name: t for t in entry.inputs}
        self.outputs = {t.name: t for t in entry.outputs}
        self._device_type = "cuda" if device.type == "cuda" else "cpu"
        self._device_id = device.index or 0
        self._bindings: dict[Any, tuple] = {}  # slot -> (IO binding, what it has bound): see run
        self._lock = threading.Lock()
        self.last_run_seconds: float | None = None  # the engine's own time in the latest run

    def _check_io(self) -> None:
        for kind, got, want in (
            ("input", self.session.get_inputs(), self.entry.inputs),
            ("output", self.session.get_outputs(), self.entry.outputs),
        ):
            got_map = {a.name: a for a in got}
            if [a.name for a in got] != [t.name for t in want]:
                raise HybridStitchError(
                    f"the {self.name} engine's {kind}s are {[a.name for a in got]}, the manifest says "
                    f"{[t.name for t in want]}; the engine folder is inconsistent: re-export it"
                )
            for t in want:
                a = got_map[t.name]
                if list(a.shape) != list(t.shape) or a.type != ORT_TYPES[t.dtype]:
                    raise HybridStitchError(
                        f"the {self.name} engine's {kind} {t.name!r} is {a.type} {list(a.shape)}, the manifest says "
                        f"{ORT_TYPES[t.dtype]} {t.shape}; re-export the engines"
                    )

    def empty(self, name: str, sizes: dict[str, int]) -> torch.Tensor:
        """An output buffer of ``name`` at the symbolic ``sizes`` (``{"batch": B, "k": k}``)."""
        t = self.outputs[name]
        return torch.empty(t.resolve(sizes), dtype=TORCH_DTYPES[t.dtype], device=self.device)

    def empty_input(self, name: str, sizes: dict[str, int]) -> torch.Tensor:
        t = self.inputs[name]
        return torch.empty(t.resolve(sizes), dtype=TORCH_DTYPES[t.dtype], device=self.device)

    def prepare(self, name: str, x: torch.Tensor, sizes: dict[str, int]) -> torch.Tensor:
        """A caller's tensor as this input wants it (device, dtype, contiguous); shape checked."""
        t = self.inputs[name]
        want = t.resolve(sizes)
        if list(x.shape) != want:
            raise HybridStitchError(
                f"{name} has shape {list(x.shape)}, the {self.name} engine takes {want} ({t.shape} with {sizes}): "
                "the resolution and text tokens are fixed at export; export others for this request"
            )
        return x.to(device=self.device, dtype=TORCH_DTYPES[t.dtype]).contiguous()

    def run(self, inputs: dict[str, Any], outputs: dict[str, Any], slot: Any = None) -> None:
        """Bind torch tensors (by pointer) or OrtValues to every input and output, then run.

        IO bindings are kept across calls, one per ``slot`` (the large graph: one per pair of cache
        sets, which alternate in a steady run), and a name is bound again only when its tensor's
        address or shape changed -- so a steady step re-binds only its latents, timesteps and
        mask. The tensors must stay alive until this returns (they do: the caller holds them)."""
        with self._lock:  # calls from several threads take turns on the bindings
            self._run_locked(inputs, outputs, slot)

    def _run_locked(self, inputs: dict[str, Any], outputs: dict[str, Any], slot: Any) -> None:
        if slot not in self._bindings:
            if len(self._bindings) >= 4:  # slots come and go with batch sizes: keep the latest few
                self._bindings.pop(next(iter(self._bindings)))
            self._bindings[slot] = (self.session.io_binding(), {})  # binding, name -> (address, shape) bound
        binding, bound = self._bindings[slot]
        for name, x in inputs.items():
            if isinstance(x, torch.Tensor):
                key = (x.data_ptr(), x.shape)
                if bound.get(name) != key:
                    binding.bind_input(name, self._device_type, self._device_id, NUMPY_DTYPES[self.inputs[name].dtype],
                                       list(x.shape), key[0])
                    bound[name] = key
            else:
                binding.bind_ortvalue_input(name, x)
                bound.pop(name, None)
        for name, y in outputs.items():
            if isinstance(y, torch.Tensor):
                key = (y.data_ptr(), y.shape)
                if bound.get("out:" + name) != key:
                    binding.bind_output(name, self._device_type, self._device_id, NUMPY_DTYPES[self.outputs[name].dtype],
                                        list(y.shape), key[0])
                    bound["out:" + name] = key
            else:
                binding.bind_ortvalue_output(name, y)
                bound.pop("out:" + name, None)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # inputs written by torch are ready
        t0 = time.perf_counter()
        self.session.run_with_iobinding(binding)
        self.last_run_seconds = time.perf_counter() - t0


# -- denoisers ---------------------------------------------------------------------------------------


def full_inputs(den: EngineDenoiser, graph: OrtGraph, sizes: dict, latents, prompt_embeds, pooled, timestep) -> dict:
    """The inputs every graph takes, as ``graph`` wants them."""
    den.check_text(prompt_embeds)
    return {
        "latents": graph.prepare("latents", latents, sizes),
        "prompt_embeds": graph.prepare("prompt_embeds", prompt_embeds, sizes),
        "pooled": graph.prepare("pooled", pooled, sizes),
        "timestep": graph.prepare("timestep", timestep, sizes),
    }


class OrtDenoiser(EngineDenoiser):
    """A full transformer engine (the small one)."""

    backend = "onnxruntime"

    @property
    def last_run_seconds(self) -> float | None:
        """The engine's own time in the latest call (the call's Python around it is the runtime's overhead)."""
        return self.graph.last_run_seconds

    def __init__(self, name: str, graph: OrtGraph, manifest, folder: str):
        super().__init__(name, manifest, folder, graph.device)
        self.graph = graph

    @torch.no_grad()
    def forward(self, latents, prompt_embeds, pooled, timestep, cache=None):
        sizes = {BATCH: latents.shape[0]}
        inputs = full_inputs(self, self.graph, sizes, latents, prompt_embeds, pooled, timestep)
        velocity = self.graph.empty("velocity", sizes)
        self.graph.run(inputs, {"velocity": velocity})
        return velocity.to(latents.dtype)


class OrtLargeDenoiser(EngineLargeDenoiser):
    """The large transformer: ONE graph (one copy of the weights) for every step. A masked step
    runs it on the k masked tokens; the full step runs it at k = N with every position, which
    rewrites every cache row and returns every token's output."""

    backend = "onnxruntime"

    @property
    def last_run_seconds(self) -> float | None:
        return self.graph.last_run_seconds

    def __init__(self, graph: OrtGraph, manifest, folder: str):
        super().__init__(manifest, folder, graph.device)
        self.graph = graph
        self._scratch: dict[int, dict[str, torch.Tensor]] = {}  # rows -> cache inputs of full steps (overwritten)
        self._every: dict[int, torch.Tensor] = {}  # rows -> [rows, N] every position: the index of full steps
        self._free: list[Caches] = []  # at most one cache set handed back (recycle): the next call writes there

    def bucket_for(self, ratio: float, num_tokens: int) -> Bucket:
        """Exactly ``ceil(ratio * N)`` tokens: the graph takes any k, so no bucket rounds it up."""
        self.check_tokens(num_tokens)
        return Bucket(ratio=ratio, masked_tokens=tokens_for_ratio(ratio, num_tokens), graph=self.graph.name)

    def validate_request(self, batch: int, height: int, width: int, mask_ratios=()) -> None:
        EngineDenoiser.validate_request(self, batch, height, width)  # any ratio: no bucket to find

    def _scratch_caches(self, rows: int) -> dict[str, torch.Tensor]:
        """Cache inputs of a full step: read by the graph, every row rewritten, so their values never matter."""
        if rows not in self._scratch:
            self._scratch[rows] = {n: self.graph.empty_input(n, {BATCH: rows}).zero_() for n in self.cache_names}
        return self._scratch[rows]

    def recycle(self, caches: Caches) -> None:
        """Hand back a cache set this denoiser returned, once nothing will read it again (the step does
        this for the batch a masked call replaced): a later call writes its updated caches there. In a
        steady run the caches alternate between two sets, each with its IO binding."""
        if any(c is caches for c in self._free):
            return
        self._free.append(caches)
        del self._free[:-1]  # the alternation needs one free set (the plan's kv_cache_spare); more would only hold memory

    def _new_caches(self, sizes: dict) -> Caches:
        """Buffers for a call's updated caches: a recycled set of the right size, else new tensors."""
        rows = sizes[BATCH]
        for i, spare in enumerate(self._free):
            if next(iter(spare.values())).shape[0] == rows:
                return self._free.pop(i)
        return {name: self.graph.empty(f"new_{name}", sizes) for name in self.cache_names}

    def _run(self, latents, prompt_embeds, pooled, timestep, index, caches: Caches) -> tuple[torch.Tensor, Caches]:
        """One run of the graph over ``caches`` (not modified): (tokens [B, k, E], the updated caches in
        other tensors -- ONNX Runtime cannot alias an output onto an input)."""
        sizes = {BATCH: latents.shape[0], MASKED: index.shape[1]}
        inputs = full_inputs(self, self.graph, sizes, latents, prompt_embeds, pooled, timestep)
        inputs["index"] = self.graph.prepare("index", index, sizes)
        for name in self.cache_names:
            inputs[name] = self.graph.prepare(name, caches[name], sizes)
        tokens = self.graph.empty("tokens", sizes)
        new = self._new_caches(sizes)
        first = self.cache_names[0]
        slot = (inputs[first].data_ptr(), new[first].data_ptr()) if self.cache_names else None
        self.graph.run(inputs, {"tokens": tokens, **{f"new_{name}": t for name, t in new.items()}}, slot=slot)
        return tokens, new

    def _full(self, latents, prompt_embeds, pooled, timestep):
        b, _, h, w = latents.shape
        if b not in self._every:
            n = self.manifest.tokens["image"]
            self._every[b] = torch.arange(n, device=self.device).expand(b, n).contiguous()  # [B, N]: all, in order
        tokens, caches = self._run(latents, prompt_embeds, pooled, timestep, self._every[b], self._scratch_caches(b))
        return unpatchify(tokens, self.spec.patch_size, h, w).to(latents.dtype), caches  # [B, C, H, W]

    @torch.no_grad()
    def forward(self, latents, prompt_embeds, pooled, timestep):
        v, caches = self._full(latents, prompt_embeds, pooled, timestep)
        if self.cache_names:
            self.recycle(caches)  # nobody saw them
        return v

    @torch.no_grad()
    def forward_store(self, latents, prompt_embeds, pooled, timestep):
        return self._full(latents, prompt_embeds, pooled, timestep)

    @torch.no_grad()
    def forward_masked(self, latents, prompt_embeds, pooled, timestep, index, caches: Caches):
        tokens, new = self._run(latents, prompt_embeds, pooled, timestep, index, caches)
        return tokens.to(latents.dtype), new


# -- loading ---------------------------------------------------------------------------------------


@dataclass
class OrtEngineSet(EngineSet):
    """The loaded ONNX Runtime engines of one folder."""

    providers: list = field(default_factory=list)


def load_engines(
    folder: str,
    providers=None,
    num_threads: int | None = None,
    check_weights: bool = True,
    verify_files: bool = True,
) -> OrtEngineSet:
    """Load an engine folder written by ``hybridstitch-export --backend onnxruntime``.

    Args:
        providers: execution providers (aliases ``cpu``, ``cuda``, ``tensorrt`` or full names);
            CPU by default.
        num_threads: ONNX Runtime intra-op threads (its default: all cores).
        check_weights: refuse engines whose source checkpoints changed since export (skipped
            for checkpoints no longer on disk).
        verify_files: hash every graph file against the manifest (sizes are always checked).
    """
    manifest = open_engine_folder(folder, "onnxruntime")
    verifier = Verifier(folder)
    check_graph_files(manifest, folder, hash_files=verify_files, verifier=verifier)
    notes: list[str] = []
    if check_weights:
        check_source_weights(manifest, notes, verifier)
    verifier.save()  # files hashed now (moved since their last hash) are trusted next time until they move

    providers = resolve_providers(providers)
    device = provider_device(providers)
    small, large = (OrtGraph(name, manifest.graphs[name], folder, providers, session_options(num_threads), device)
                    for name in ("small", "large"))
    return OrtEngineSet(
        folder=folder, manifest=manifest, large=OrtLargeDenoiser(large, manifest, folder),
        small=OrtDenoiser("small", small, manifest, folder), device=device, notes=notes, providers=providers,
    )
