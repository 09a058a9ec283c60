"""TensorRT engines from the exported graphs: one engine per graph, per GPU and TensorRT version.

``hybridstitch-export --backend tensorrt`` first exports and saves the ONNX graphs exactly as for
ONNX Runtime (they stay in the folder as the reference), then for each graph:

1. checks it: ONNX Runtime runs the graph on random inputs and must agree with the torch graph
   it was traced from (:class:`ParityFromOnnx`); bf16 graphs, which ONNX Runtime cannot run, get
   the ONNX checker with full shape inference instead;
2. prepares it for TensorRT's parser (:class:`TensorRTOnnxFromOnnx`): ``attention="plugin"``
   strips the ``CachedKVAttention`` local function and tags the nodes for the plugin
   (``plugins/onnx_for_tensorrt.py``); ``attention="standard"`` inlines the function into its
   standard-op decomposition (ScatterND / Concat / MatMul-Softmax-MatMul) for TensorRT's
   own attention fusion;
3. builds a strongly typed engine with Polygraphy (:class:`EngineBytesFromOnnx`): the precision
   is the graph's own (fp16 / bf16 / fp32 tensors, fp32 blocks included), shapes are static,
   the builder optimisation level, hardware compatibility and a per-GPU timing cache as asked;
   ``compiler="torch-tensorrt"`` compiles the torch graph with Torch-TensorRT instead
   (:mod:`.torch_tensorrt_build`).

Build steps are small callables named for what they turn into what, as Polygraphy's loaders,
and run only when called. What touches TensorRT sits behind :class:`TensorRTToolchain`
(imported lazily), so this module imports, plans and checks on machines without it.

Layout::

    ENGINE_DIR/manifest.json, small.onnx, large.onnx, large_masked_*.onnx    (the reference graphs)
    ENGINE_DIR/tensorrt/<target>/trt<version>/timing.cache
    ENGINE_DIR/tensorrt/<target>/trt<version>/<compiler>-<attention>/<graph>.plan

``<target>`` is ``sm89`` (engines for compute capability 8.9 only, TensorRT's default),
``sm89-samecc`` (hardware compatibility "same_compute_capability") or ``ampere_plus``
(hardware compatibility "ampere_plus": any GPU of compute capability >= 8.0). Several builds
(GPUs, TensorRT versions, plugin vs standard attention, compilers) live side by side in one
folder; the manifest's ``tensorrt`` section lists them::

    "tensorrt": {
      "builds": {"sm89/trt10.9.0.34/onnx-plugin": {
          "dir": "tensorrt/sm89/trt10.9.0.34/onnx-plugin", "compiler": "onnx", "attention": "plugin",
          "gpu": "NVIDIA RTX 6000 Ada Generation", "compute_capability": [8, 9],
          "tensorrt_version": "10.9.0.34", "hardware_compatibility": "none",
          "builder_optimization_level": null, "strongly_typed": true, "precision": "fp16", "fp32_blocks": [35],
          "plugin": {"id": "hybridstitch::CachedKVAttention", "implementation": "aot", "ptx_target": "sm_89"} | null,
          "python_plugins": [],                 # plugins the runtime must register before loading (JIT ones)
          "timing_cache": "tensorrt/sm89/trt10.9.0.34/timing.cache" | null,
          "complete": true, "created": "...", "updated": "...",
          "engines": {"small": {"file": "tensorrt/.../small.plan", "size": ..., "sha256": "...",
                                "key": "<sha256 of what it was built from>", "onnx_sha256": "...",
                                "io_names": {"latents": "latents", ...}, "built": "..."}, ...}}},
      "verified": {"small": {"onnx_sha256": "...", "result": "onnxruntime (CPUExecutionProvider): ..."}, ...}
    }

A rerun skips every engine whose key matches and whose file is intact, so an interrupted build
resumes; an engine whose key equals one of a sibling build on the same GPU and TensorRT version
(the full graphs have no attention node, so ``plugin`` and ``standard`` builds share them) is
hard-linked rather than rebuilt. Engines and the manifest are written atomically.

The build options, the device description and the choice of a build at load time live with the
runtime (:mod:`hybridstitch.engine.builds`): loading refuses a build made for another GPU,
TensorRT version or hardware-compatibility mode with a message that says how to re-export.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Callable

from hybridstitch.engine.builds import (
    TENSORRT_DIR,
    DeviceInfo,
    EngineProfile,
    EngineTensor,
    TensorRTOptions,
    build_id,
    check_engine_file,
    current_device,
    engine_profiles,
    onnx_sha256,
    profile_shapes,
    ptx_target,
    shape_matches,
    timing_cache_path,
)
from hybridstitch.engine.manifest import BATCH, EXPORT_TMP_PREFIX, MASKED, file_record, sha256_json, utc_now
from hybridstitch.errors import HybridStitchError
from hybridstitch.fileio import atomic_write_bytes

from .tensorrt_steps import EngineBytesFromOnnx, ParityFromOnnx, TensorRTOnnxFromOnnx

log = logging.getLogger(__name__)


def engine_key(entry, build: dict, profiles: list) -> str:
    """What an engine is built from: its ONNX graph, its optimization profiles, the build options,
    the GPU target and TensorRT.

    The attention mode only counts for graphs holding the attention node, so the small engines of
    a ``plugin`` and a ``standard`` build share one key (and one file)."""
    parts = dict(
        onnx=onnx_sha256(entry), profiles=profiles, compiler=build["compiler"], precision=build["precision"],
        fp32_blocks=build["fp32_blocks"], tensorrt=build["tensorrt_version"], target=build["dir"].split("/")[1],
        hardware_compatibility=build["hardware_compatibility"],
        builder_optimization_level=build["builder_optimization_level"], strongly_typed=build["strongly_typed"],
    )
    if entry.custom_nodes:
        parts.update(attention=build["attention"], plugin=build["plugin"])
    return sha256_json(parts)


_PLUGIN_TARGET: list[str] = []  # the PTX target this process registered the plugin with


class TensorRTToolchain:
    """What a build needs from TensorRT on this machine. CPU tests hand :func:`build_engines` a fake."""

    def check_available(self, options: TensorRTOptions) -> None:
        """Refuse a TensorRT export before anything is written when this machine cannot build engines."""
        import importlib.util

        import torch

        if importlib.util.find_spec("tensorrt") is None:
            raise HybridStitchError(
                "TensorRT is not installed: pip install hybridstitch[gpu] (tensorrt, polygraphy) on a machine with an "
                "NVIDIA GPU, or export with --backend onnxruntime"
            )
        needed = {"onnx": ("polygraphy", "polygraphy"), "torch-tensorrt": ("torch_tensorrt", "torch-tensorrt")}
        module, package = needed[options.compiler]
        if importlib.util.find_spec(module) is None:
            raise HybridStitchError(f"--compiler {options.compiler} needs {package}: pip install {package}")
        if not torch.cuda.is_available():
            raise HybridStitchError(
                "TensorRT builds engines for the GPU it runs on, and torch sees no CUDA device here; run the export "
                "on the GPU machine that will serve the engines (with a CUDA build of torch)"
            )

    def device(self) -> DeviceInfo:
        return current_device()

    def register_plugin(self, target: str) -> dict:
        """Register the AOT attention plugin; returns the manifest's plugin record."""
        from hybridstitch.plugins.tensorrt_plugin import plugin_record, register_plugin

        if _PLUGIN_TARGET and _PLUGIN_TARGET[0] != target:
            # TensorRT cannot unregister a Python plugin: its first registration (and PTX) stays
            raise HybridStitchError(
                f"this process registered the attention plugin with {_PLUGIN_TARGET[0]} PTX; building engines that "
                f"need {target} PTX takes a fresh process (run hybridstitch-export again)"
            )
        register_plugin(target=target)
        _PLUGIN_TARGET[:] = [target]
        return plugin_record(target)

    def engine_from_onnx(self, path: str, options: TensorRTOptions, timing_cache: str | None, plugin: bool,
                         profiles: list[dict[str, tuple]]) -> bytes:
        return EngineBytesFromOnnx(path, options, timing_cache, aliased_plugin_io=plugin, profiles=profiles)()

    def engine_from_torch(self, module, example: tuple, options: TensorRTOptions, timing_cache: str | None,
                          dynamic_shapes: dict, ranges: list) -> bytes:
        from .torch_tensorrt_build import EngineBytesFromTorch

        return EngineBytesFromTorch(module, example, options, timing_cache, dynamic_shapes, ranges)()

    def engine_io(self, data: bytes) -> list[EngineTensor]:
        """The I/O tensors of a serialized engine, in the engine's order (read as the runtime reads them)."""
        from hybridstitch.engine.tensorrt_engine import TrtRuntime

        runtime = TrtRuntime()
        return runtime.io(runtime.deserialize(data, "the engine just built"))


def match_engine_io(entry, tensors: list[EngineTensor], by_position: bool) -> dict[str, str]:
    """Map the graph's planned I/O names to the engine's, checking direction, shape and dtype.

    ONNX-path engines keep the graph's names; Torch-TensorRT names them itself, so its inputs
    and outputs are matched by position. Raises HybridStitchError naming the tensor that differs.
    """
    mapping = {}
    for is_input, planned in ((True, entry.inputs), (False, entry.outputs)):
        side = [t for t in tensors if t.is_input == is_input]
        kind = "input" if is_input else "output"
        if len(side) != len(planned):
            raise HybridStitchError(
                f"the engine has {len(side)} {kind}s ({[t.name for t in side]}), the graph {len(planned)} "
                f"({[t.name for t in planned]})"
            )
        by_name = {t.name: t for t in side}
        for i, want in enumerate(planned):
            got = side[i] if by_position else by_name.get(want.name)
            if got is None:
                raise HybridStitchError(f"the engine has no {kind} {want.name!r} (it has {sorted(by_name)})")
            if not shape_matches(got.shape, want.shape) or got.dtype != want.dtype:
                raise HybridStitchError(
                    f"the engine's {kind} {got.name!r} ({want.name}) is {got.dtype} {list(got.shape)}, the graph's is "
                    f"{want.dtype} {want.shape}"
                )
            mapping[want.name] = got.name
    return mapping


def _write_atomic(data: bytes, path: str) -> dict:
    """Write ``data`` to ``path`` atomically; returns its file record."""
    atomic_write_bytes(path, data, prefix=EXPORT_TMP_PREFIX)
    record = file_record(path)
    del record["name"]
    return record


def _link_or_copy(src: str, dst: str) -> None:
    """``dst`` becomes a hard link to ``src`` (a copy across file systems), atomically."""
    folder, name = os.path.split(dst)
    tmp = os.path.join(folder, f"{EXPORT_TMP_PREFIX}{name}")
    if os.path.exists(tmp):
        os.unlink(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


# -- the build driver ------------------------------------------------------------------------------------------


def new_build_record(manifest, options: TensorRTOptions, device: DeviceInfo, plugin: dict | None) -> tuple[str, dict]:
    bid = build_id(device, options)
    timing = os.path.abspath(options.timing_cache) if options.timing_cache is not None else timing_cache_path(device)
    record = dict(
        dir=f"{TENSORRT_DIR}/{bid}", compiler=options.compiler, attention=options.attention, gpu=device.name,
        compute_capability=list(device.compute_capability), tensorrt_version=device.tensorrt_version,
        hardware_compatibility=options.hardware_compatibility,
        builder_optimization_level=options.builder_optimization_level, strongly_typed=True,
        precision=manifest.precision, fp32_blocks=list(manifest.fp32_blocks), plugin=plugin,
        python_plugins=[], timing_cache=timing, complete=False, created=utc_now(), updated="", engines={},
    )
    return bid, record


def build_engines(plan, out: str, loaders: dict, progress: bool = True,
                  toolchain: TensorRTToolchain | None = None) -> dict:
    """Build (or finish building) this machine's TensorRT engines of every graph in ``out``.

    ``plan``: the :class:`~.plan.ExportPlan` whose ONNX graphs are already in ``out``;
    ``loaders``: role -> :class:`~.onnx_steps.DenoiserFromCheckpoint` (called only when a
    parity check or a Torch-TensorRT build needs the torch graph). Returns the build record.
    """
    from tqdm.auto import tqdm

    from .graphs import GRAPH_MODULES, GraphShapes, dynamic_shapes, example_inputs
    from .request import DTYPES

    toolchain = toolchain or TensorRTToolchain()
    req, manifest = plan.request, plan.manifest
    options: TensorRTOptions = req.tensorrt
    device = toolchain.device()
    masked = [name for name, e in manifest.graphs.items() if e.custom_nodes]
    plugin = None
    if masked and options.attention == "plugin":
        if options.compiler == "onnx":
            plugin = toolchain.register_plugin(ptx_target(device, options.hardware_compatibility))
        else:
            from hybridstitch.plugins.torch_tensorrt_plugin import OP_PLUGIN

            plugin = dict(id=OP_PLUGIN, implementation="jit (Torch-TensorRT generated from the torch.library op)")
    bid, build = new_build_record(manifest, options, device, plugin)
    if plugin is not None and options.compiler == "torch-tensorrt":
        build["python_plugins"] = [plugin["id"]]
    section = manifest.tensorrt or {}
    section.setdefault("builds", {})
    section.setdefault("verified", {})
    manifest.tensorrt = section
    previous = section["builds"].get(bid)
    if previous is not None:
        build["created"] = previous.get("created", build["created"])
    build_dir = os.path.join(out, build["dir"])
    os.makedirs(build_dir, exist_ok=True)
    for name in os.listdir(build_dir):  # temporary files of a build that was killed mid-write
        if name.startswith(EXPORT_TMP_PREFIX):
            os.unlink(os.path.join(build_dir, name))
    timing = build["timing_cache"] if os.path.isabs(build["timing_cache"]) else os.path.join(out, build["timing_cache"])
    os.makedirs(os.path.dirname(timing), exist_ok=True)
    changed = previous is None or previous.get("complete") is not True

    shapes = GraphShapes(manifest.batch, *manifest.latent_size, manifest.tokens["text"])
    for name in ("small", "large"):
        entry = manifest.graphs[name]
        profiles = build_profiles(manifest, name, options.compiler)
        key = engine_key(entry, build, profiles)
        rel_file = f"{build['dir']}/{name}.plan"
        bar = tqdm(total=3, desc=f"{name} (TensorRT)", unit="step", disable=not progress, leave=True)
        try:
            old = (previous or {}).get("engines", {}).get(name)
            if old is not None and old["key"] == key and check_engine_file(out, old) is None:
                build["engines"][name] = old
                bar.set_postfix_str("up to date")
                bar.update(3)
                continue
            changed = True
            sibling = _sibling_engine(section, build, key, out)
            if sibling is not None:
                _link_or_copy(os.path.join(out, sibling["file"]), os.path.join(out, rel_file))
                build["engines"][name] = dict(sibling, file=rel_file, built=utc_now())
                bar.set_postfix_str("shared with a sibling build")
                bar.update(3)
            else:
                spec = manifest.spec(name)
                module_fn = _module_fn(loaders[name], GRAPH_MODULES[name])
                at = next((p for p in profiles if p.get(BATCH) == manifest.batch), profiles[0])
                first = {k: (v if isinstance(v, int) else v[1]) for k, v in at.items()}
                example = example_inputs(name, spec, shapes, DTYPES[manifest.precision], first.get(MASKED),
                                         batch=first[BATCH])
                bar.set_postfix_str("verify")
                _verify(section, entry, name, out, options, module_fn, example, manifest.precision)
                bar.update(1)
                bar.set_postfix_str("build")
                if options.compiler == "torch-tensorrt":
                    ranges = profile_shapes(entry, profiles[0])
                    data = toolchain.engine_from_torch(module_fn(), example, options, timing,
                                                       dynamic_shapes(name, spec, shapes),
                                                       [ranges.get(t.name) for t in entry.inputs])
                else:
                    data = _build_from_onnx(toolchain, options, out, name, entry, timing, plugin is not None,
                                            [profile_shapes(entry, p) for p in profiles])
                io_names = match_engine_io(entry, toolchain.engine_io(data), by_position=options.compiler != "onnx")
                bar.update(1)
                bar.set_postfix_str("save")
                record = _write_atomic(data, os.path.join(out, rel_file))
                build["engines"][name] = dict(file=rel_file, **record, key=key, onnx_sha256=onnx_sha256(entry),
                                              profiles=profiles, io_names=io_names, built=utc_now())
                bar.update(1)
            build["updated"] = utc_now()
            section["builds"][bid] = build
            manifest.save(out)  # progress survives an interruption
        finally:
            bar.close()
    build["complete"] = True
    if changed:
        build["updated"] = build["updated"] or utc_now()
        section["builds"][bid] = build
        manifest.save(out)
    else:
        section["builds"][bid] = previous  # an up-to-date rerun writes nothing
    return section["builds"][bid]


def _sibling_engine(section: dict, build: dict, key: str, out: str) -> dict | None:
    """An intact engine with this key in another build of the same target and TensorRT version."""
    parent = build["dir"].rsplit("/", 1)[0]
    for other in section["builds"].values():
        if other is build or other.get("dir", "").rsplit("/", 1)[0] != parent:
            continue
        for record in other.get("engines", {}).values():
            if record["key"] == key and check_engine_file(out, record, hash_files=False) is None:
                return record
    return None


def _module_fn(loader, graph_class) -> Callable:
    module = {}

    def make():
        if "m" not in module:
            module["m"] = graph_class(loader()).eval()
        return module["m"]

    return make


def _verify(section, entry, name, out, options, module_fn, example, precision) -> None:
    sha = onnx_sha256(entry)
    done = section["verified"].get(name)
    if options.verify == "none" or (done is not None and done.get("onnx_sha256") == sha):
        return
    result = ParityFromOnnx(os.path.join(out, entry.file), module_fn, example,
                            [t.name for t in entry.outputs], precision)()
    log.info("%s: %s", name, result)
    section["verified"][name] = dict(onnx_sha256=sha, result=result, checked=utc_now())


def build_profiles(manifest, name: str, compiler: str) -> list[EngineProfile]:
    """The optimization profiles of an engine: static ones per batch and bucket (the ONNX path), or,
    for Torch-TensorRT (one profile per engine), one spanning them: the batch from 1 to the largest,
    k from the smallest bucket to N, optimised for the largest batch and bucket."""
    profiles = engine_profiles(manifest, name)
    if compiler != "torch-tensorrt" or len(profiles) == 1:
        return profiles
    batches = sorted({p[BATCH] for p in profiles})
    one = {BATCH: [batches[0], batches[-1], batches[-1]]}
    if MASKED in profiles[0]:
        ks = sorted({p[MASKED] for p in profiles})
        one[MASKED] = [ks[0], ks[-2] if len(ks) > 1 else ks[-1], ks[-1]]
    return [one]


def _build_from_onnx(toolchain, options, out, name, entry, timing, plugin: bool, profiles) -> bytes:
    src = os.path.join(out, entry.file)
    prepared = os.path.join(out, f"{EXPORT_TMP_PREFIX}trt-{name}.{options.attention}.onnx")  # beside its external data
    try:
        TensorRTOnnxFromOnnx(src, prepared, options.attention)()
        return toolchain.engine_from_onnx(prepared, options, timing, plugin=plugin and bool(entry.custom_nodes),
                                          profiles=profiles)
    finally:
        if os.path.exists(prepared):
            os.unlink(prepared)


__all__ = ["TensorRTToolchain", "build_engines", "build_profiles", "engine_key", "match_engine_io", "new_build_record",
           "shape_matches"]
