"""One TensorRT engine as the backend runs it, in the manner of TensorRT-LLM's session:
:class:`TrtRuntime` (deserialising, describing I/O and profiles, making contexts on user-managed
memory), :class:`DeviceMemory` (the one activation block an engine set's contexts share) and
:class:`TrtEngine` (one context per optimization profile, persistent I/O buffers per profile,
CUDA graphs captured per binding). The denoisers over them are in :mod:`.tensorrt_backend`.

TensorRT is imported lazily (:class:`TrtRuntime`); this module imports on machines without it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from hybridstitch.errors import HybridStitchError

from .builds import EngineTensor, profile_covers, shape_matches
from .manifest import BATCH

log = logging.getLogger(__name__)

TORCH_DTYPES = {
    "float": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64,
    "int32": torch.int32,
}


# Captured CUDA graphs kept per profile: a graph holds the cache addresses it was captured with,
# and those change when the batch's samples change; the caching allocator keeps reusing a few.
MAX_GRAPHS_PER_PROFILE = 8


def is_cache(name: str) -> bool:
    return name.startswith("cache_") or name.startswith("new_cache_")


class TrtRuntime:
    """TensorRT as the backend uses it: deserialising engines, describing their I/O tensors and
    optimization profiles, and making execution contexts on user-managed memory."""

    def __init__(self):
        try:
            import tensorrt as trt
        except ImportError as e:
            raise HybridStitchError(
                "TensorRT is not installed: pip install hybridstitch[gpu] on the GPU machine that built the engines "
                "(or run ONNX Runtime engines: hybridstitch-export --backend onnxruntime)"
            ) from e
        from hybridstitch.plugins.tensorrt_plugin import require_supported_tensorrt

        require_supported_tensorrt(trt.__version__)
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
        """The engine's I/O tensors in its own order (-1 for a dynamic dimension), dtypes as ONNX
        element type names."""
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

    def num_profiles(self, engine) -> int:
        return engine.num_optimization_profiles

    def profile_memory(self, engine, profile: int) -> int:
        """Device memory (bytes) a context of ``profile`` needs for its activations."""
        return int(engine.get_device_memory_size_for_profile_v2(profile))

    def context(self, engine, profile: int, stream_handle: int):
        """An execution context of ``profile`` that owns no device memory (the caller provides it)."""
        context = engine.create_execution_context(self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise HybridStitchError("TensorRT could not create an execution context (out of GPU memory?)")
        if profile and not context.set_optimization_profile_async(profile, stream_handle):
            raise HybridStitchError(f"TensorRT refused optimization profile {profile} for a new context")
        return context


class DeviceMemory:
    """The one activation block every context of an engine set uses (they run one at a time on
    one stream), sized to the largest profile's need; 256-byte aligned as TensorRT wants."""

    def __init__(self, device: torch.device):
        self.device = device
        self.block: torch.Tensor | None = None
        self.size = 0

    def reserve(self, size: int) -> None:
        self.size = max(self.size, int(size))

    def allocate(self) -> tuple[int, int]:
        """(address, size) of the block, allocated on first call."""
        if self.block is None:
            self.block = torch.empty(max(self.size, 1) + 256, dtype=torch.uint8, device=self.device)
        address = self.block.data_ptr()
        return address + (-address) % 256, self.size


# -- one engine ---------------------------------------------------------------------------------------------


@dataclass
class _Profile:
    """One optimization profile of an engine: its context, its I/O buffers (all but the caches) per
    set of sizes, and the CUDA graphs captured on them."""

    index: int
    sizes: dict  # symbol -> int, or [min, opt, max]
    context: Any
    buffers: dict = field(default_factory=dict)  # sizes tuple -> {name: tensor}
    graphs: dict = field(default_factory=dict)  # call key -> torch.cuda.CUDAGraph


class TrtEngine:
    """One engine: its profiles (one execution context each, on the engine set's shared device
    memory), their persistent I/O buffers and captured CUDA graphs."""

    def __init__(self, name: str, entry, record: dict, engine, runtime, device: torch.device, stream,
                 cuda_graphs: bool, notes: list[str]):
        self.name, self.entry, self.device, self.stream = name, entry, device, stream
        self.inputs = {t.name: t for t in entry.inputs}
        self.outputs = {t.name: t for t in entry.outputs}
        self.io_names = dict(record.get("io_names") or {t: t for t in [*self.inputs, *self.outputs]})
        self._check_io(runtime.io(engine))
        self.engine, self.runtime = engine, runtime
        self.profile_sizes = list(record.get("profiles") or [{}])
        have = runtime.num_profiles(engine)
        if have != len(self.profile_sizes):
            raise HybridStitchError(
                f"the {name} engine has {have} optimization profiles, the manifest lists {len(self.profile_sizes)}; "
                "the engine folder is inconsistent: re-export it"
            )
        self.profiles: list[_Profile] = []
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        self._notes = notes

    def memory_need(self) -> int:
        return max(self.runtime.profile_memory(self.engine, i) for i in range(len(self.profile_sizes)))

    def activate(self, memory: DeviceMemory) -> None:
        """One context per profile, all on ``memory`` (the engine set's shared block)."""
        address, size = memory.allocate()
        handle = self.stream.cuda_stream if self.stream is not None else 0
        for i, sizes in enumerate(self.profile_sizes):
            context = self.runtime.context(self.engine, i, handle)
            context.set_device_memory(address, size)
            self.profiles.append(_Profile(i, sizes, context))

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
            if not shape_matches(t.shape, want.shape) or t.dtype != want.dtype:
                raise HybridStitchError(
                    f"the {self.name} engine's {kind} {want.name!r} is {t.dtype} {list(t.shape)}, the manifest says "
                    f"{want.dtype} {want.shape}; re-export the engines"
                )

    def covers(self, sizes: dict[str, int]) -> bool:
        return any(profile_covers(p, sizes) for p in self.profile_sizes)

    def _profile(self, sizes: dict[str, int]) -> tuple[_Profile, dict[str, int]]:
        """The profile that runs ``sizes`` and the sizes it runs them at: the batch padded up to the
        smallest profile batch that holds it (profiles are static per batch and k)."""
        for p in self.profiles:
            if profile_covers(p.sizes, sizes):
                return p, dict(sizes)
        batch = sizes.get(BATCH)
        fits = []
        for p in self.profiles:
            want = p.sizes.get(BATCH)
            if batch is None or not isinstance(want, int) or want < batch:
                continue
            padded = dict(sizes, **{BATCH: want})
            if profile_covers(p.sizes, padded):
                fits.append((want, p, padded))
        if fits:
            _, p, padded = min(fits, key=lambda f: f[0])
            return p, padded
        raise HybridStitchError(
            f"the {self.name} engine has no optimization profile for {sizes} (it has {self.profile_sizes}); "
            "re-export with the batch and buckets this request needs"
        )

    def run_sizes(self, sizes: dict[str, int]) -> dict[str, int]:
        """The sizes ``sizes`` run at (the batch padded up to a profile's)."""
        return self._profile(sizes)[1]

    def max_batch(self) -> int | None:
        """The largest batch a profile takes (None when some profile's batch is unbounded here)."""
        batches = [p.get(BATCH) for p in self.profile_sizes]
        if any(b is None for b in batches):
            return None
        return max(b if isinstance(b, int) else b[-1] for b in batches)

    def _buffers(self, profile: _Profile, sizes: dict[str, int]) -> dict[str, torch.Tensor]:
        key = tuple(sorted(sizes.items()))
        buffers = profile.buffers.get(key)
        if buffers is None:  # once per profile (and set of sizes): shapes are set on the context then
            buffers = {
                n: torch.empty(t.resolve(sizes), dtype=TORCH_DTYPES[t.dtype], device=self.device)
                for n, t in [*self.inputs.items(), *self.outputs.items()] if not is_cache(n)
            }
            profile.buffers[key] = buffers
        for name, t in self.inputs.items():
            if not profile.context.set_input_shape(self.io_names.get(name, name), t.resolve(sizes)):
                raise HybridStitchError(f"TensorRT refused the shape {t.resolve(sizes)} of {name} ({self.name} engine)")
        return buffers

    def run(self, inputs: dict[str, torch.Tensor], sizes: dict[str, int], caches: dict[str, torch.Tensor] | None = None,
            new_caches: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Run at ``sizes``: ``inputs`` copied into the profile's buffers (shapes checked), ``caches``
        (input names -> tensors) and ``new_caches`` (output names -> tensors to write) bound by address.
        Returns the output buffers (valid until the next run), at the padded batch when the request's
        batch had no profile of its own (the caller keeps the first rows)."""
        caches, new_caches = caches or {}, new_caches or {}
        profile, run_sizes = self._profile(sizes)
        buffers = self._buffers(profile, run_sizes)
        for name, x in inputs.items():
            want = list(buffers[name].shape)
            if list(x.shape[1:]) != want[1:] or x.shape[0] > want[0]:
                raise HybridStitchError(
                    f"{name} has shape {list(x.shape)}, the {self.name} engine takes {want} "
                    "here: the resolution and text tokens are fixed at export"
                )
            buffers[name][: x.shape[0]].copy_(x)
            if x.shape[0] < want[0]:  # padding rows: a copy of the last real row, their outputs are dropped
                buffers[name][x.shape[0]:].copy_(x[-1:].expand(want[0] - x.shape[0], *x.shape[1:]))
        bound = {**buffers, **caches, **new_caches}
        # a captured graph replays the addresses it was captured with: key it by them
        graph_key = (tuple(sorted(run_sizes.items())), tuple(sorted((n, t.data_ptr()) for n, t in {**caches,
                                                                                                  **new_caches}.items())))
        graph = profile.graphs.get(graph_key)
        if graph is not None:
            profile.graphs[graph_key] = profile.graphs.pop(graph_key)  # most recently used last
            graph.replay()
            return buffers
        for name, tensor in bound.items():
            profile.context.set_tensor_address(self.io_names.get(name, name), tensor.data_ptr())
        self._execute(profile)
        if self.cuda_graphs:
            self._capture(profile, graph_key)
        return buffers

    def _execute(self, profile: _Profile) -> None:
        handle = self.stream.cuda_stream if self.stream is not None else 0
        if not profile.context.execute_async_v3(handle):
            raise HybridStitchError(f"TensorRT failed to run the {self.name} engine (its log above says why)")

    def _capture(self, profile: _Profile, key) -> None:
        # the addresses just bound are the ones the graph keeps; the execution above was the warm-up
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                self._execute(profile)
        except Exception as e:  # capture is an optimisation: run uncaptured from now on
            self.cuda_graphs = False
            for p in self.profiles:
                p.graphs.clear()
            note = f"{self.name}: CUDA graph capture failed ({type(e).__name__}: {e}); running without CUDA graphs"
            log.warning(note)
            self._notes.append(note)
            return
        profile.graphs[key] = graph
        while len(profile.graphs) > MAX_GRAPHS_PER_PROFILE:  # cache buffers move as batches change: keep the recent
            profile.graphs.pop(next(iter(profile.graphs)))


__all__ = ["DeviceMemory", "TORCH_DTYPES", "TrtEngine", "TrtRuntime", "is_cache"]
