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

Runtime, in the manner of TensorRT-LLM's session and TensorRT's demo/Diffusion (the engine session itself is
:mod:`.tensorrt_engine`):

* two engines: the small one, and ONE large engine (one copy of the weights) with one
  optimization profile per (batch, bucket) -- min = opt = max, so every bucket keeps its
  static-shape kernels -- plus the k = N profiles that run the full step. A batch without a
  profile of its own is padded up to the next one (the padding rows' outputs are dropped). Each
  profile gets one execution context, created with user-managed device memory: every context of
  both engines shares ONE activation block sized to the largest (they run one at a time on one
  stream), as demo/Diffusion's engines do;
* every I/O buffer but the caches is a torch CUDA tensor allocated once per profile (inputs are
  copied into theirs, outputs copied out to the caller's dtype), bound with
  ``set_tensor_address`` after ``set_input_shape`` and run with ``execute_async_v3`` on the
  engines' one CUDA stream;
* the KV caches belong to the caller (:mod:`hybridstitch.kvcache`, one per sample, batched per
  call): bound by address as inputs, and the updated caches written into new device tensors.
  TensorRT may alias an output onto an input only inside the network, not across its I/O
  boundary, so the plugin's in-place cache update becomes, at the engine's edge, "copy the cache
  once, update k rows";
* CUDA graphs: per profile the shapes are static, and a call is captured into a
  ``torch.cuda.CUDAGraph`` after its first execution (TensorRT's advice: enqueue once before
  capturing; capture errors are thread-local, as trtexec's), keyed by the cache addresses it
  binds; torch's caching allocator hands the same few cache buffers back step after step, so
  steady batches replay (a few graphs per profile are kept). Fallback: engines with a Python
  (JIT) plugin -- Torch-TensorRT's -- and any engine whose capture fails run
  ``execute_async_v3`` directly (the failure is logged once and listed in ``EngineSet.notes``);
  ``cuda_graphs=False`` turns capture off.

TensorRT is imported lazily (:class:`TrtRuntime`); this module imports on machines without it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field

import torch

from hybridstitch.errors import HybridStitchError
from hybridstitch.tokens import unpatchify

from .base import (
    EngineDenoiser,
    EngineLargeDenoiser,
    EngineSet,
    check_source_weights,
    open_engine_folder,
    required_graphs,
)
from .builds import check_engine_file, current_device, onnx_sha256, select_build
from .integrity import Verifier
from .manifest import BATCH, MASKED
from .tensorrt_engine import TORCH_DTYPES, DeviceMemory, TrtEngine, TrtRuntime

log = logging.getLogger(__name__)


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


def text_inputs(den: EngineDenoiser, latents, prompt_embeds, pooled, timestep) -> dict[str, torch.Tensor]:
    den.check_text(prompt_embeds)
    return {"latents": latents, "prompt_embeds": prompt_embeds, "pooled": pooled, "timestep": timestep}


def batch_problem(engine: TrtEngine, manifest, batch: int) -> str | None:
    if engine.covers({BATCH: batch}) or (engine.max_batch() or 0) >= batch:
        return None  # a profile's own batch, or padded up to one
    return f"hold TensorRT profiles up to batch {engine.max_batch()} (CFG included)"


class TrtDenoiser(EngineDenoiser):
    """A full transformer engine (the small one)."""

    backend = "tensorrt"

    def __init__(self, name: str, engine: TrtEngine, manifest, folder: str, stream: _Stream):
        super().__init__(name, manifest, folder, engine.device)
        self.engine = engine
        self.stream = stream

    def batch_problem(self, batch: int) -> str | None:
        return batch_problem(self.engine, self.manifest, batch)

    @torch.no_grad()
    def forward(self, latents, prompt_embeds, pooled, timestep):
        b = latents.shape[0]
        with self.stream():
            out = self.engine.run(text_inputs(self, latents, prompt_embeds, pooled, timestep), {BATCH: b})
        return out["velocity"][:b].to(device=latents.device, dtype=latents.dtype, copy=True)


class TrtLargeDenoiser(EngineLargeDenoiser):
    """The large transformer: ONE engine (one copy of the weights), one profile per bucket (and
    batch) plus the k = N profile of the full step. The caches belong to the caller: bound by
    address as inputs, the updated ones written into new device tensors (an engine cannot alias an
    output onto an input across its I/O boundary)."""

    backend = "tensorrt"

    def __init__(self, engine: TrtEngine, manifest, folder: str, stream: _Stream):
        super().__init__(manifest, folder, engine.device)
        self.engine = engine
        self.stream = stream
        self._scratch: dict[int, dict[str, torch.Tensor]] = {}  # rows -> cache inputs of full steps

    def batch_problem(self, batch: int) -> str | None:
        return batch_problem(self.engine, self.manifest, batch)

    def _empty_caches(self, rows: int) -> dict[str, torch.Tensor]:
        return {n: torch.empty(self.engine.inputs[n].resolve({BATCH: rows}), dtype=TORCH_DTYPES[self.engine.inputs[n].dtype],
                               device=self.device) for n in self.cache_names}

    def _run(self, latents, prompt_embeds, pooled, timestep, index, caches: dict | None):
        """One run: the tokens [B, k, E] and the updated caches (new tensors, B rows)."""
        b = latents.shape[0]
        sizes = {BATCH: b, MASKED: index.shape[1]}
        rows = self.engine.run_sizes(sizes)[BATCH]
        if caches is None:  # the full step: every row is rewritten, the inputs' values never matter
            caches = self._scratch.setdefault(rows, self._empty_caches(rows))
        elif rows > b:  # padded to the profile's batch: the padding rows repeat the last one
            caches = {n: torch.cat([t, t[-1:].expand(rows - b, *t.shape[1:])]) for n, t in caches.items()}
        new = self._empty_caches(rows)
        inputs = {**text_inputs(self, latents, prompt_embeds, pooled, timestep), "index": index}
        with self.stream():
            out = self.engine.run(inputs, sizes, {n: t.contiguous() for n, t in caches.items()},
                                  {f"new_{n}": t for n, t in new.items()})
            tokens = out["tokens"][:b].to(device=latents.device, dtype=latents.dtype, copy=True)
        return tokens, {n: t[:b] for n, t in new.items()}

    def _full(self, latents, prompt_embeds, pooled, timestep):
        b, _, h, w = latents.shape
        n = self.manifest.tokens["image"]
        every = torch.arange(n, device=self.device).expand(b, n)  # [B, N]: the full step is k = N
        tokens, caches = self._run(latents, prompt_embeds, pooled, timestep, every, None)
        return unpatchify(tokens, self.spec.patch_size, h, w), caches  # [B, C, H, W]

    @torch.no_grad()
    def forward(self, latents, prompt_embeds, pooled, timestep):
        return self._full(latents, prompt_embeds, pooled, timestep)[0]

    @torch.no_grad()
    def forward_store(self, latents, prompt_embeds, pooled, timestep):
        return self._full(latents, prompt_embeds, pooled, timestep)

    @torch.no_grad()
    def forward_masked(self, latents, prompt_embeds, pooled, timestep, index, caches):
        return self._run(latents, prompt_embeds, pooled, timestep, index, caches)


# -- loading ------------------------------------------------------------------------------------------------


@dataclass
class TrtEngineSet(EngineSet):
    """The loaded engines of one folder's build for this GPU."""

    build_id: str = ""
    build: dict = field(default_factory=dict)
    memory: DeviceMemory | None = None  # the activation block every context shares


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
    verifier = Verifier(folder)
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
        why = check_engine_file(folder, record, hash_files=verify_files, verifier=verifier)
        if why is not None:
            raise HybridStitchError(
                f"the {name} engine of {build_id} in {folder} is not as built: {why}. Rerun hybridstitch-export with "
                "the same arguments on this machine: it rebuilds only the damaged engines"
            )
    notes: list[str] = []
    if check_weights:
        check_source_weights(manifest, notes, verifier)
    verifier.save()

    if build.get("python_plugins"):
        # Torch-TensorRT's JIT plugin calls back into Python: register it before deserialising
        from hybridstitch.plugins.torch_tensorrt_plugin import register_op_plugin

        register_op_plugin()
        if cuda_graphs:
            notes.append("engines with a Python (JIT) plugin run without CUDA graphs")
        cuda_graphs = False
    runtime = runtime or TrtRuntime()
    stream = _Stream(device)
    engines = {}
    for name in required_graphs(manifest):
        record = build["engines"][name]
        with open(os.path.join(folder, record["file"]), "rb") as f:
            engine = runtime.deserialize(f.read(), record["file"])
        engines[name] = TrtEngine(name, manifest.graphs[name], record, engine, runtime, device, stream.stream,
                                  cuda_graphs, notes)
    memory = DeviceMemory(device)
    for engine in engines.values():
        memory.reserve(engine.memory_need())
    for engine in engines.values():
        engine.activate(memory)
    return TrtEngineSet(
        folder=folder, manifest=manifest, large=TrtLargeDenoiser(engines["large"], manifest, folder, stream),
        small=TrtDenoiser("small", engines["small"], manifest, folder, stream), device=device, notes=notes,
        build_id=build_id, build=build, memory=memory,
    )


__all__ = ["DeviceMemory", "TrtDenoiser", "TrtEngine", "TrtEngineSet", "TrtLargeDenoiser", "TrtRuntime",
           "load_engines"]
