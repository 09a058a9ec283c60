"""The TensorRT backend: engines built by ``hybridstitch-export --backend tensorrt`` behind the
:class:`~hybridstitch.denoiser.Denoiser` interface.

    engines = load_engines("engines/")                                   # this GPU's build
    pipe = HybridStitchPipeline.from_engines("engines/", backend="tensorrt")

Loading picks the folder's build that runs on this GPU and TensorRT version (ONNX path before
Torch-TensorRT, plugin before standard attention; ``attention=`` / ``compiler=`` choose) and
refuses with the command to re-export when none does
(:func:`hybridstitch.engine.builds.select_build`). Each engine file is checked against
the manifest (size, and sha256 unless ``verify_files=False``) and each engine's I/O names,
directions, shapes and dtypes against the graph it was built from, with errors that name the
tensor, before any request.

Runtime, in the manner of TensorRT-LLM's session:

* every engine is deserialised once and gets one execution context; every I/O buffer is a torch
  CUDA tensor allocated once (inputs are copied into theirs, outputs are copied out to the
  caller's dtype), bound with ``set_tensor_address`` and run with ``execute_async_v3`` on one
  CUDA stream that the engines share;
* the KV cache lives on the device between steps, in two buffer sets owned by the large
  denoiser (:class:`TrtKVCache`): a full step writes the current set in place; a masked step
  reads the current set and writes the spare one, then they swap. TensorRT may alias an output
  onto an input only inside the network, not across its I/O boundary, so the plugin's in-place
  cache update becomes, at the engine's edge, "copy the cache once, update k rows": the two sets
  make that copy the only one. Both sets are allocated once, so one request at a time runs on an
  engine set (a second ``new_cache`` retires the first);
* CUDA graphs: shapes are static, and every call of an engine binds one of at most two address
  sets (which cache set is read / written), so after the first execution of each, the call is
  captured into a ``torch.cuda.CUDAGraph`` (TensorRT's advice: enqueue once before capturing)
  and later calls replay it. Fallback: engines with a Python (JIT) plugin -- Torch-TensorRT's --
  and any engine whose capture fails run ``execute_async_v3`` directly (the failure is logged
  once and listed in ``EngineSet.notes``); ``cuda_graphs=False`` turns capture off.

TensorRT is imported lazily (:class:`TrtRuntime`); this module imports on machines without it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from hybridstitch.denoiser import require_filled
from hybridstitch.errors import HybridStitchError

from .base import (
    EngineDenoiser,
    EngineLargeDenoiser,
    EngineSet,
    check_source_weights,
    load_graphs,
    open_engine_folder,
    required_graphs,
)
from .builds import EngineTensor, check_engine_file, current_device, onnx_sha256, select_build

log = logging.getLogger(__name__)

TORCH_DTYPES = {
    "float": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64,
    "int32": torch.int32,
}


def _is_cache(name: str) -> bool:
    return name.startswith("cache_") or name.startswith("new_cache_")


class TrtRuntime:
    """TensorRT as the backend uses it: deserialising engines and describing their I/O tensors."""

    def __init__(self):
        try:
            import tensorrt as trt
        except ImportError as e:
            raise HybridStitchError(
                "TensorRT is not installed: pip install hybridstitch[gpu] on the GPU machine that built the engines "
                "(or run ONNX Runtime engines: hybridstitch-export --backend onnxruntime)"
            ) from e
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)

    def deserialize(self, data: bytes, where: str):
        engine = self.runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise HybridStitchError(
                f"TensorRT could not deserialize {where} (see its log above): the file may come from another "
                "TensorRT version or GPU than the manifest says; re-export the engines on this machine"
            )
        return engine

    def io(self, engine) -> list[EngineTensor]:
        """The engine's I/O tensors in its own order, dtypes as ONNX element type names."""
        trt = self.trt
        names = {trt.float32: "float", trt.float16: "float16", trt.bfloat16: "bfloat16", trt.int64: "int64",
                 trt.int32: "int32"}
        out = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            out.append(EngineTensor(
                name=name, is_input=engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
                shape=tuple(engine.get_tensor_shape(name)), dtype=names.get(engine.get_tensor_dtype(name), "?"),
            ))
        return out


# -- one engine ---------------------------------------------------------------------------------------------


class TrtGraph:
    """One engine: its execution context, its persistent I/O buffers (all but the caches) and its
    captured CUDA graphs, one per cache binding."""

    def __init__(self, name: str, entry, record: dict, engine, runtime, device: torch.device, stream,
                 cuda_graphs: bool, notes: list[str]):
        self.name, self.entry, self.device, self.stream = name, entry, device, stream
        self.inputs = {t.name: t for t in entry.inputs}
        self.outputs = {t.name: t for t in entry.outputs}
        self.io_names = dict(record.get("io_names") or {t: t for t in [*self.inputs, *self.outputs]})
        self._check_io(runtime.io(engine))
        self.engine = engine
        self.context = engine.create_execution_context()
        if self.context is None:
            raise HybridStitchError(
                f"TensorRT could not create an execution context for the {name} engine (out of GPU memory?)"
            )
        self.buffers = {
            n: torch.empty(t.shape, dtype=TORCH_DTYPES[t.dtype], device=device)
            for n, t in [*self.inputs.items(), *self.outputs.items()] if not _is_cache(n)
        }
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        self._graphs: dict[Any, Any] = {}
        self._notes = notes

    def _check_io(self, tensors) -> None:
        got = {t.name: t for t in tensors}
        planned = [(True, t) for t in self.entry.inputs] + [(False, t) for t in self.entry.outputs]
        if len(got) != len(planned):
            raise HybridStitchError(
                f"the {self.name} engine has I/O tensors {sorted(got)}, the manifest lists "
                f"{[t.name for _, t in planned]}; the engine folder is inconsistent: re-export it"
            )
        for is_input, want in planned:
            kind = "input" if is_input else "output"
            t = got.get(self.io_names.get(want.name, want.name))
            if t is None or t.is_input != is_input:
                raise HybridStitchError(
                    f"the {self.name} engine has no {kind} {self.io_names.get(want.name, want.name)!r} ({want.name}); "
                    "the engine folder is inconsistent: re-export it"
                )
            if list(t.shape) != list(want.shape) or t.dtype != want.dtype:
                raise HybridStitchError(
                    f"the {self.name} engine's {kind} {want.name!r} is {t.dtype} {list(t.shape)}, the manifest says "
                    f"{want.dtype} {want.shape}; re-export the engines"
                )

    def load(self, name: str, x: torch.Tensor) -> None:
        """Copy a caller's tensor into this input's buffer (on the current stream); shape checked."""
        t = self.inputs[name]
        if list(x.shape) != t.shape:
            raise HybridStitchError(
                f"{name} has shape {list(x.shape)}, the {self.name} engine takes {t.shape} "
                "(engines have fixed shapes: export others for this request)"
            )
        self.buffers[name].copy_(x)

    def run(self, caches: dict[str, torch.Tensor], key) -> None:
        """Run with the persistent buffers and ``caches`` (I/O name -> the cache set's tensor)."""
        graph = self._graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        bindings = {**self.buffers, **caches}
        for name, tensor in bindings.items():
            self.context.set_tensor_address(self.io_names.get(name, name), tensor.data_ptr())
        self._execute()
        if self.cuda_graphs:
            self._capture(key)

    def _execute(self) -> None:
        handle = self.stream.cuda_stream if self.stream is not None else 0
        if not self.context.execute_async_v3(handle):
            raise HybridStitchError(f"TensorRT failed to run the {self.name} engine (its log above says why)")

    def _capture(self, key) -> None:
        # the addresses just bound are the ones the graph keeps; the execution above was the warm-up
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream):
                self._execute()
        except Exception as e:  # capture is an optimisation: run uncaptured from now on
            self.cuda_graphs = False
            self._graphs.clear()
            note = f"{self.name}: CUDA graph capture failed ({type(e).__name__}: {e}); running without CUDA graphs"
            log.warning(note)
            self._notes.append(note)
            return
        self._graphs[key] = graph


# -- the cache ------------------------------------------------------------------------------------------------


@dataclass
class TrtKVCache:
    """One request's image-token K/V of every slot, on the device, in two buffer sets owned by the
    large denoiser: ``sets[index]`` holds the latest cache (names ``cache_k.{slot}`` /
    ``cache_v.{slot}``, each ``[B, H, N, D]``); a masked step writes the other set and they swap."""

    batch: int
    num_tokens: int
    sets: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]
    index: int = 0
    filled: bool = False

    @property
    def current(self) -> dict[str, torch.Tensor]:
        return self.sets[self.index]

    @property
    def spare(self) -> dict[str, torch.Tensor]:
        return self.sets[1 - self.index]

    def swap(self) -> None:
        self.index = 1 - self.index

    def to_torch(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the current cache (for checks; the runtime never needs it)."""
        return {name: t.detach().to("cpu", copy=True) for name, t in self.current.items()}


# -- denoisers ---------------------------------------------------------------------------------------------


class _Stream:
    """The engine set's one CUDA stream, entered around each call: it waits for the caller's
    stream before reading inputs, and the caller's stream waits for it before using outputs."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def __call__(self):
        if self.stream is None:
            yield
            return
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            yield
        caller.wait_stream(self.stream)


def load_full(den: EngineDenoiser, graph: TrtGraph, latents, prompt_embeds, pooled, timestep) -> None:
    """Copy the inputs every graph takes into ``graph``'s buffers."""
    den.check_text(prompt_embeds)
    for name, x in (("latents", latents), ("prompt_embeds", prompt_embeds), ("pooled", pooled),
                    ("timestep", timestep)):
        graph.load(name, x)


class TrtDenoiser(EngineDenoiser):
    """A full transformer engine (the small one)."""

    backend = "tensorrt"

    def __init__(self, name: str, graph: TrtGraph, manifest, folder: str, stream: _Stream):
        super().__init__(name, manifest, folder, graph.device)
        self.graph = graph
        self.stream = stream

    @torch.no_grad()
    def forward(self, latents, prompt_embeds, pooled, timestep, cache=None):
        with self.stream():
            load_full(self, self.graph, latents, prompt_embeds, pooled, timestep)
            self.graph.run({}, key="full")
        return self.graph.buffers["velocity"].to(device=latents.device, dtype=latents.dtype, copy=True)


class TrtLargeDenoiser(EngineLargeDenoiser):
    """The large transformer: its full graph (cache outputs) and one masked graph per bucket."""

    backend = "tensorrt"

    def __init__(self, graph: TrtGraph, masked: dict[int, TrtGraph], manifest, folder: str, stream: _Stream):
        super().__init__(manifest, folder, graph.device)
        self.graph = graph
        self.masked = masked  # masked tokens k -> graph
        self.stream = stream
        self._sets: tuple[dict, dict] | None = None
        self._active: TrtKVCache | None = None

    def _cache_sets(self) -> tuple[dict, dict]:
        if self._sets is None:  # allocated once, on first need
            self._sets = tuple(
                {n: torch.empty(self.graph.outputs[n].shape, dtype=TORCH_DTYPES[self.graph.outputs[n].dtype],
                                device=self.device) for n in self.cache_names}
                for _ in range(2)
            )
        return self._sets

    def new_cache(self, batch: int, height: int, width: int) -> TrtKVCache:
        self.check_cache_request(batch, height, width)
        self._active = TrtKVCache(batch=batch, num_tokens=self.manifest.tokens["image"], sets=self._cache_sets())
        return self._active

    def _check_cache(self, cache: TrtKVCache) -> None:
        if cache is not self._active:
            raise HybridStitchError(
                "this KV cache belongs to an earlier request: the TensorRT caches live in the engine set's device "
                "buffers, so one request at a time runs on it (new_cache retires the previous cache). Load another "
                "engine set for concurrent requests"
            )

    @torch.no_grad()
    def forward(self, latents, prompt_embeds, pooled, timestep, cache: TrtKVCache | None = None):
        sets = self._cache_sets()
        if cache is None:
            # the cache outputs still need somewhere to go: the spare set holds nothing live
            target = 1 - self._active.index if self._active is not None else 1
        else:
            self._check_cache(cache)
            target = cache.index  # a full step rewrites every row: the current set, in place
        with self.stream():
            load_full(self, self.graph, latents, prompt_embeds, pooled, timestep)
            self.graph.run(dict(sets[target]), key=("full", target))
        if cache is not None:
            cache.filled = True
        return self.graph.buffers["velocity"].to(device=latents.device, dtype=latents.dtype, copy=True)

    @torch.no_grad()
    def forward_masked(self, latents, prompt_embeds, pooled, timestep, index, cache: TrtKVCache):
        self._check_cache(cache)
        require_filled(cache)
        graph = self.graph_for(self.masked, int(index.shape[1]))
        caches = {**cache.current, **{f"new_{name}": t for name, t in cache.spare.items()}}
        with self.stream():
            load_full(self, graph, latents, prompt_embeds, pooled, timestep)
            graph.load("index", index)
            graph.run(caches, key=("masked", cache.index))
        cache.swap()
        return graph.buffers["tokens"].to(device=latents.device, dtype=latents.dtype, copy=True)


# -- loading ------------------------------------------------------------------------------------------------


@dataclass
class TrtEngineSet(EngineSet):
    """The loaded engines of one folder's build for this GPU."""

    build_id: str = ""
    build: dict = field(default_factory=dict)


def load_engines(
    folder: str,
    attention: str | None = None,
    compiler: str | None = None,
    device: str | torch.device | None = None,
    cuda_graphs: bool = True,
    check_weights: bool = True,
    verify_files: bool = True,
    runtime=None,
    device_info=None,
) -> TrtEngineSet:
    """Load this GPU's TensorRT engines from a folder written by ``hybridstitch-export --backend tensorrt``.

    Args:
        attention: ``"plugin"`` or ``"standard"`` to pick a build (default: plugin if built).
        compiler: ``"onnx"`` or ``"torch-tensorrt"`` to pick a build (default: onnx if built).
        device: the CUDA device (default ``cuda:0``).
        cuda_graphs: capture each engine call into a CUDA graph after its first run.
        check_weights: refuse engines whose source checkpoints changed since export.
        verify_files: hash every engine file against the manifest (sizes are always checked).
        runtime, device_info: what stands for TensorRT and this GPU (:class:`TrtRuntime` and
            :func:`~hybridstitch.engine.builds.current_device` by default; tests pass fakes).
    """
    manifest = open_engine_folder(folder, "tensorrt")
    device = torch.device(device) if device is not None else torch.device("cuda", 0)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    device_info = device_info or current_device(device.index or 0)
    build_id, build = select_build(manifest, device_info, folder, attention=attention, compiler=compiler)
    for name in required_graphs(manifest):
        record = build["engines"].get(name)
        if manifest.graphs.get(name) is None or record is None:
            raise HybridStitchError(
                f"the {build_id} build in {folder} has no {name} engine; rerun hybridstitch-export with the same "
                "arguments on this machine: it builds only what is missing"
            )
        if record.get("onnx_sha256") != onnx_sha256(manifest.graphs[name]):
            raise HybridStitchError(
                f"the {name} engine of {build_id} in {folder} was built from an earlier {name} graph; rerun "
                "hybridstitch-export with the same arguments on this machine to rebuild it"
            )
        why = check_engine_file(folder, record, hash_files=verify_files)
        if why is not None:
            raise HybridStitchError(
                f"the {name} engine of {build_id} in {folder} is not as built: {why}. Rerun hybridstitch-export with "
                "the same arguments on this machine: it rebuilds only the damaged engines"
            )
    notes: list[str] = []
    if check_weights:
        check_source_weights(manifest, notes)

    if build.get("python_plugins"):
        # Torch-TensorRT's JIT plugin calls back into Python: register it before deserialising
        from hybridstitch.plugins.torch_tensorrt_plugin import register_op_plugin

        register_op_plugin()
        if cuda_graphs:
            notes.append("engines with a Python (JIT) plugin run without CUDA graphs")
        cuda_graphs = False
    runtime = runtime or TrtRuntime()
    stream = _Stream(device)

    def graph(name: str) -> TrtGraph:
        record = build["engines"][name]
        with open(os.path.join(folder, record["file"]), "rb") as f:
            engine = runtime.deserialize(f.read(), record["file"])
        return TrtGraph(name, manifest.graphs[name], record, engine, runtime, device, stream.stream, cuda_graphs, notes)

    small, large, masked = load_graphs(manifest, graph)
    return TrtEngineSet(
        folder=folder, manifest=manifest, large=TrtLargeDenoiser(large, masked, manifest, folder, stream),
        small=TrtDenoiser("small", small, manifest, folder, stream), device=device, notes=notes,
        build_id=build_id, build=build,
    )


__all__ = ["TrtDenoiser", "TrtEngineSet", "TrtGraph", "TrtKVCache", "TrtLargeDenoiser", "TrtRuntime", "load_engines"]
