"""TensorRT engines from the exported graphs: one engine per graph, per GPU and TensorRT version.

``hybridstitch-export --backend tensorrt`` first exports and saves the ONNX graphs exactly as for
ONNX Runtime (they stay in the folder as the reference), then for each graph:

1. checks it: ONNX Runtime runs the graph on random inputs and must agree with the torch graph
   it was traced from (:class:`ParityFromOnnx`); bf16 graphs, which ONNX Runtime cannot run, get
   the ONNX checker with full shape inference instead;
2. prepares it for TensorRT's parser (:class:`TensorRTOnnxFromOnnx`): ``attention="plugin"``
   strips the ``CachedKVAttention`` local function and tags the nodes for the plugin
   (``plugins/onnx_for_tensorrt.py``); ``attention="standard"`` inlines the function into its
   standard-op decomposition (Concat / ScatterElements / MatMul-Softmax-MatMul) for TensorRT's
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

Loading refuses a build made for another GPU, TensorRT version or hardware-compatibility mode
with a message that says how to re-export (:func:`why_build_cannot_run`, :func:`select_build`:
pure functions of the manifest and a :class:`DeviceInfo`, tested with fake ones).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

from hybridstitch.errors import HybridStitchError

from .manifest import file_problem, sha256_file, sha256_json, utc_now

log = logging.getLogger(__name__)

COMPILERS = ("onnx", "torch-tensorrt")
ATTENTIONS = ("plugin", "standard")
HARDWARE_COMPATIBILITY = ("none", "ampere_plus", "same_compute_capability")
VERIFY = ("onnxruntime", "none")
TENSORRT_DIR = "tensorrt"
TIMING_CACHE_NAME = "timing.cache"
# Relative error max|ort - torch| / max|torch| a graph may show before TensorRT is handed it.
PARITY_TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2}
# ONNX element type names of TensorRT's I/O types (as the manifest writes them).
DTYPE_NAMES = ("float", "float16", "bfloat16", "int64", "int32")


# -- options and the device -------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorRTOptions:
    """How ``--backend tensorrt`` builds. Defaults: ONNX path, the plugin, TensorRT's defaults."""

    compiler: str = "onnx"  # onnx (Polygraphy) | torch-tensorrt
    attention: str = "plugin"  # plugin | standard (masked graphs without the plugin)
    builder_optimization_level: int | None = None  # 0..5; None: TensorRT's default (3)
    hardware_compatibility: str = "none"  # none | ampere_plus | same_compute_capability
    timing_cache: str | None = None  # None: tensorrt/<target>/trt<version>/timing.cache in the engine folder
    verify: str = "onnxruntime"  # onnxruntime | none: check each ONNX graph before building from it

    def __post_init__(self) -> None:
        for name, allowed in (("compiler", COMPILERS), ("attention", ATTENTIONS),
                              ("hardware_compatibility", HARDWARE_COMPATIBILITY), ("verify", VERIFY)):
            value = getattr(self, name)
            if value not in allowed:
                raise HybridStitchError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        level = self.builder_optimization_level
        if level is not None and (not isinstance(level, int) or not 0 <= level <= 5):
            raise HybridStitchError(f"builder optimisation level must be an integer 0..5, got {level!r}")
        if self.compiler == "torch-tensorrt" and self.attention != "plugin":
            raise HybridStitchError(
                "--compiler torch-tensorrt hands the attention op to Torch-TensorRT as a plugin; for "
                "--attention standard use --compiler onnx"
            )
        if self.compiler == "torch-tensorrt" and self.hardware_compatibility == "same_compute_capability":
            raise HybridStitchError(
                "Torch-TensorRT offers Ampere-plus hardware compatibility only: use --hardware-compatibility "
                "ampere_plus or none with --compiler torch-tensorrt, or --compiler onnx"
            )


@dataclass(frozen=True)
class DeviceInfo:
    """The GPU and TensorRT an engine is built on or loaded on."""

    name: str
    compute_capability: tuple[int, int]
    tensorrt_version: str

    @property
    def sm(self) -> str:
        major, minor = self.compute_capability
        return f"sm{major}{minor}"

    def describe(self) -> str:
        major, minor = self.compute_capability
        return f"{self.name} (compute capability {major}.{minor}), TensorRT {self.tensorrt_version}"


def current_device(index: int = 0) -> DeviceInfo:
    """This machine's GPU ``index`` (as torch numbers them) and installed TensorRT."""
    import torch

    if not torch.cuda.is_available():
        raise HybridStitchError("no CUDA GPU visible to torch: TensorRT engines need one (and a CUDA build of torch)")
    try:
        import tensorrt
    except ImportError as e:
        raise HybridStitchError("TensorRT is not installed: pip install hybridstitch[gpu] (tensorrt >= 10.8)") from e
    props = torch.cuda.get_device_properties(index)
    return DeviceInfo(name=props.name, compute_capability=(props.major, props.minor),
                      tensorrt_version=tensorrt.__version__)


# -- naming and refusals (pure) ----------------------------------------------------------------------------


def build_target(device: DeviceInfo, hardware_compatibility: str) -> str:
    """The folder a build's engines go to for this GPU: ``sm89``, ``sm89-samecc`` or ``ampere_plus``."""
    if hardware_compatibility == "ampere_plus":
        return "ampere_plus"
    if hardware_compatibility == "same_compute_capability":
        return f"{device.sm}-samecc"
    return device.sm


def build_id(device: DeviceInfo, options: TensorRTOptions) -> str:
    """``sm89/trt10.9.0.34/onnx-plugin``: target, TensorRT version, compiler and attention."""
    target = build_target(device, options.hardware_compatibility)
    return f"{target}/trt{device.tensorrt_version}/{options.compiler}-{options.attention}"


def ptx_target(device: DeviceInfo, hardware_compatibility: str) -> str:
    """PTX target of the plugin kernel: sm_80 for Ampere-plus engines (runs on every GPU they run on),
    else the build GPU's own (see :func:`hybridstitch.plugins.tensorrt_plugin.target_for_capability`)."""
    from hybridstitch.plugins.tensorrt_plugin import target_for_capability

    if hardware_compatibility == "ampere_plus":
        return "sm_80"
    return target_for_capability(*device.compute_capability)


def _ptx_runs_on(target: str, capability: tuple[int, int]) -> bool:
    # PTX for sm_80 / sm_89 is JIT-compiled forward by the driver; Triton's sm_90 PTX is sm_90a
    # (wgmma) and runs on compute capability 9.0 only
    want = int(target.removeprefix("sm_"))
    have = 10 * capability[0] + capability[1]
    return have == want if want == 90 else have >= want


def why_build_cannot_run(build: dict, device: DeviceInfo) -> str | None:
    """Why the engines of ``build`` (a manifest build record) cannot run on ``device`` (None: they can)."""
    if build.get("tensorrt_version") != device.tensorrt_version:
        return (
            f"built with TensorRT {build.get('tensorrt_version')}, this machine has TensorRT {device.tensorrt_version} "
            "(engines are tied to the TensorRT version that built them)"
        )
    built = tuple(build.get("compute_capability", ()))
    have = tuple(device.compute_capability)
    cc = ".".join(map(str, have))
    hw = build.get("hardware_compatibility", "none")
    where = f"{build.get('gpu', '?')} (compute capability {'.'.join(map(str, built))})"
    if hw == "ampere_plus":
        if have < (8, 0):
            return f"hardware-compatible engines run on Ampere or newer (compute capability >= 8.0); this GPU is {cc}"
    elif built != have:
        mode = " (hardware compatibility: same compute capability)" if hw == "same_compute_capability" else ""
        return f"built on {where}{mode}; this GPU, {device.name}, has compute capability {cc}"
    plugin = build.get("plugin")
    if plugin and not _ptx_runs_on(plugin["ptx_target"], have):
        return f"its attention plugin holds {plugin['ptx_target']} PTX, which does not run on compute capability {cc}"
    if not build.get("complete"):
        return "its build did not finish"
    return None


def reexport_command(manifest, folder: str, options: TensorRTOptions | None = None) -> str:
    """The ``hybridstitch-export`` command that builds this folder's engines on the machine it runs on."""
    r = manifest.resolution
    opts = options or TensorRTOptions()
    parts = [
        "hybridstitch-export", "--backend tensorrt",
        f"--large {manifest.models['large']['path']}", f"--small {manifest.models['small']['path']}",
        f"--height {r['height']}", f"--width {r['width']}", f"--batch {manifest.batch}",
        f"--text-tokens {manifest.tokens['text']}",
        "--buckets " + " ".join(f"{b:g}" for b in manifest.bucket_ratios()),
        f"--precision {manifest.precision}", f"--opset {manifest.opset}",
    ]
    if opts.compiler != "onnx":
        parts.append(f"--compiler {opts.compiler}")
    if opts.attention != "plugin":
        parts.append(f"--attention {opts.attention}")
    parts.append(f"--out {folder}")
    return " ".join(parts)


def select_build(manifest, device: DeviceInfo, folder: str, attention: str | None = None,
                 compiler: str | None = None) -> tuple[str, dict]:
    """The build of ``manifest`` to load on ``device``: ``(build id, record)``.

    Among the builds that run on the device (and match ``attention`` / ``compiler`` when given),
    the ONNX path is preferred to Torch-TensorRT and the plugin to standard attention. None
    that runs: a HybridStitchError listing every build and why, with the command to re-export.
    """
    builds = (manifest.tensorrt or {}).get("builds", {})
    wanted = TensorRTOptions(compiler=compiler or "onnx", attention=attention or "plugin")
    if not builds:
        raise HybridStitchError(
            f"{folder} holds no TensorRT engines (its manifest lists no TensorRT build). Build them on this "
            f"machine: {reexport_command(manifest, folder, wanted)}"
        )
    reasons, runnable = [], []
    for bid, build in builds.items():
        if attention is not None and build.get("attention") != attention:
            reasons.append(f"{bid}: attention {build.get('attention')}, not {attention}")
            continue
        if compiler is not None and build.get("compiler") != compiler:
            reasons.append(f"{bid}: compiler {build.get('compiler')}, not {compiler}")
            continue
        why = why_build_cannot_run(build, device)
        if why is None:
            runnable.append((bid, build))
        else:
            reasons.append(f"{bid}: {why}")
    if not runnable:
        raise HybridStitchError(
            f"none of the TensorRT engines in {folder} can run here ({device.describe()}): "
            + "; ".join(reasons)
            + f". Re-export on this machine (the ONNX graphs in the folder are reused, only the engines are "
            f"built): {reexport_command(manifest, folder, wanted)}"
        )

    def preference(item):
        bid, build = item
        return (build.get("compiler") != "onnx", build.get("attention") != "plugin",
                build.get("hardware_compatibility") != "none", bid)

    return min(runnable, key=preference)


def check_engine_file(folder: str, record: dict, hash_files: bool = True) -> str | None:
    """Why an engine file is not as built (None when it is). Reads only."""
    return file_problem(folder, record["file"], record["size"], record["sha256"], hash_files, recorded_at="build")


def onnx_sha256(entry) -> str:
    """One hash over a graph's ONNX files (the .onnx and its external data) as recorded at export."""
    return sha256_json([(f["name"], f["sha256"]) for f in entry.files])


def engine_key(entry, build: dict) -> str:
    """What an engine is built from: its ONNX graph, the build options, the GPU target and TensorRT.

    The attention mode only counts for graphs holding the attention node, so the full graphs of
    a ``plugin`` and a ``standard`` build share one key (and one file)."""
    parts = dict(
        onnx=onnx_sha256(entry), compiler=build["compiler"], precision=build["precision"],
        fp32_blocks=build["fp32_blocks"], tensorrt=build["tensorrt_version"], target=build["dir"].split("/")[1],
        hardware_compatibility=build["hardware_compatibility"],
        builder_optimization_level=build["builder_optimization_level"], strongly_typed=build["strongly_typed"],
    )
    if entry.custom_nodes:
        parts.update(attention=build["attention"], plugin=build["plugin"])
    return sha256_json(parts)


# -- build steps ---------------------------------------------------------------------------------------------


class TensorRTOnnxFromOnnx:
    """An exported ONNX file -> the ONNX file TensorRT's parser is given, next to it (external data
    is referenced by relative path, so it must stay in the same folder). Returns the new path.

    ``plugin``: our local function stripped, nodes tagged ``plugin_namespace``/``plugin_version``;
    ``standard``: the function inlined into standard ops and the custom domain dropped.
    """

    def __init__(self, src: str, dst: str, attention: str):
        self.src, self.dst, self.attention = src, dst, attention

    def __call__(self) -> str:
        import onnx

        if self.attention == "plugin":
            from hybridstitch.plugins.onnx_for_tensorrt import prepare_file_for_tensorrt

            return str(prepare_file_for_tensorrt(self.src, self.dst))
        import onnx.inliner

        from hybridstitch.plugins import OP_DOMAIN

        model = onnx.load(self.src, load_external_data=False)
        inlined = onnx.inliner.inline_local_functions(model)
        kept = [o for o in inlined.opset_import if o.domain != OP_DOMAIN]
        del inlined.opset_import[:]
        inlined.opset_import.extend(kept)
        tmp = self.dst + ".tmp"
        onnx.save(inlined, tmp)
        os.replace(tmp, self.dst)
        return self.dst


class ParityFromOnnx:
    """An exported ONNX file and the torch graph it came from -> the check that they agree.

    ONNX Runtime runs the file on ``example`` inputs (numpy, through the CUDA provider when
    onnxruntime-gpu and a GPU are there, else the CPU one) and the torch graph runs on the same
    inputs; the relative error ``max|ort - torch| / max|torch|`` of every output must stay under
    the precision's tolerance. Returns a one-line summary; raises HybridStitchError otherwise.
    bf16 graphs (no ONNX Runtime kernels) get the ONNX checker with full shape inference.
    """

    def __init__(self, path: str, module_fn: Callable, example: tuple, output_names: list[str], precision: str):
        self.path, self.module_fn, self.example = path, module_fn, example
        self.output_names, self.precision = output_names, precision

    def __call__(self) -> str:
        if self.precision == "bf16":
            import onnx

            onnx.checker.check_model(self.path, full_check=True)  # by path: graphs over 2 GB
            return "onnx checker with full shape inference (bf16: ONNX Runtime has no bfloat16 kernels)"
        import numpy as np
        import onnxruntime as ort
        import torch

        use_cuda = torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()
        provider = "CUDAExecutionProvider" if use_cuda else "CPUExecutionProvider"
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the torch side, independently
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(self.path, options, providers=[provider])
        names = [i.name for i in session.get_inputs()]
        feeds = {n: x.detach().cpu().numpy() for n, x in zip(names, self.example)}
        got = session.run(None, feeds)
        del session
        module = self.module_fn()
        previous = next(module.parameters()).device
        with torch.no_grad():
            module.to(device)
            try:
                want = module(*(x.to(device) for x in self.example))
            finally:
                module.to(previous)
        want = want if isinstance(want, (tuple, list)) else (want,)
        worst, tol = 0.0, PARITY_TOLERANCE[self.precision]
        for name, a, b in zip(self.output_names, got, want):
            b = b.detach().float().cpu().numpy()
            err = float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-12))
            if not err <= tol:
                raise HybridStitchError(
                    f"{os.path.basename(self.path)}: ONNX Runtime's {name!r} differs from the torch graph's by "
                    f"{err:.3g} (relative; tolerance {tol:g} in {self.precision}). The graph is not handed to "
                    "TensorRT. Export in fp32 to tell an exporter bug from fp16 range trouble, or add the overflowing "
                    "blocks to --fp32-blocks"
                )
            worst = max(worst, err)
        return f"onnxruntime ({provider}) vs torch ({device.type}): max relative error {worst:.2e} (tolerance {tol:g})"


class EngineBytesFromOnnx:
    """A TensorRT-ready ONNX file -> a serialized, strongly typed engine, through Polygraphy.

    ``NetworkFromOnnxPath(path, strongly_typed=True)`` (types from the graph: no precision
    flags), ``CreateConfig`` with the timing cache, builder optimisation level and hardware
    compatibility, the aliased-plugin-I/O preview feature when the plugin is in the graph, and
    ``EngineBytesFromNetwork(..., save_timing_cache=...)``.
    """

    def __init__(self, path: str, options: TensorRTOptions, timing_cache: str | None, aliased_plugin_io: bool):
        self.path, self.options = path, options
        self.timing_cache, self.aliased_plugin_io = timing_cache, aliased_plugin_io

    def loader(self, trt):
        """The Polygraphy loader chain (``trt``: the tensorrt module, for its enums); nothing runs
        until it is called."""
        from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, PostprocessConfig

        network = NetworkFromOnnxPath(self.path, strongly_typed=True)
        config = CreateConfig(**create_config_kwargs(self.options, trt, self.timing_cache))
        if self.aliased_plugin_io:
            # PostprocessConfig keeps TensorRT's default preview features (CreateConfig's
            # preview_features would switch off every feature not listed)
            config = PostprocessConfig(config, _enable_aliased_plugin_io)
        return EngineBytesFromNetwork(network, config=config, save_timing_cache=self.timing_cache)

    def __call__(self) -> bytes:
        import tensorrt as trt
        from polygraphy.exception import PolygraphyException

        loader = self.loader(trt)
        try:
            return bytes(loader())
        except PolygraphyException as e:
            raise HybridStitchError(
                f"TensorRT could not build {os.path.basename(self.path)}: {e}. The TensorRT log above names the "
                "layer; --attention standard builds without the plugin, --fp32-blocks keeps overflowing blocks in fp32"
            ) from e


def _enable_aliased_plugin_io(builder, network, config) -> None:
    from hybridstitch.plugins.tensorrt_plugin import enable_aliased_plugin_io

    enable_aliased_plugin_io(config)


def create_config_kwargs(options: TensorRTOptions, trt, timing_cache: str | None) -> dict:
    """Polygraphy ``CreateConfig`` arguments for ``options`` (``trt``: the tensorrt module, for its enums)."""
    kwargs: dict[str, Any] = {}
    if timing_cache is not None:
        kwargs["load_timing_cache"] = timing_cache  # a missing file: Polygraphy starts an empty cache
    if options.builder_optimization_level is not None:
        kwargs["builder_optimization_level"] = options.builder_optimization_level
    if options.hardware_compatibility != "none":
        kwargs["hardware_compatibility_level"] = getattr(
            trt.HardwareCompatibilityLevel, options.hardware_compatibility.upper()
        )
    return kwargs


@dataclass(frozen=True)
class EngineTensor:
    """One I/O tensor of a built engine."""

    name: str
    is_input: bool
    shape: tuple[int, ...]
    dtype: str  # ONNX element type name (DTYPE_NAMES)


_PLUGIN_TARGET: list[str] = []  # the PTX target this process registered the plugin with


class TensorRTToolchain:
    """What a build needs from TensorRT on this machine. CPU tests hand :func:`build_engines` a fake."""

    def device(self) -> DeviceInfo:
        return current_device()

    def register_plugin(self, target: str) -> dict:
        """Register the AOT attention plugin; returns the manifest's plugin record."""
        from hybridstitch.plugins.tensorrt_plugin import PLUGIN_ID, register_plugin

        if _PLUGIN_TARGET and _PLUGIN_TARGET[0] != target:
            # TensorRT cannot unregister a Python plugin: its first registration (and PTX) stays
            raise HybridStitchError(
                f"this process registered the attention plugin with {_PLUGIN_TARGET[0]} PTX; building engines that "
                f"need {target} PTX takes a fresh process (run hybridstitch-export again)"
            )
        register_plugin(target=target)
        _PLUGIN_TARGET[:] = [target]
        return dict(id=PLUGIN_ID, implementation="aot", ptx_target=target)

    def engine_from_onnx(self, path: str, options: TensorRTOptions, timing_cache: str | None, plugin: bool) -> bytes:
        return EngineBytesFromOnnx(path, options, timing_cache, aliased_plugin_io=plugin)()

    def engine_from_torch(self, module, example: tuple, options: TensorRTOptions, timing_cache: str | None) -> bytes:
        from .torch_tensorrt_build import EngineBytesFromTorch

        return EngineBytesFromTorch(module, example, options, timing_cache)()

    def engine_io(self, data: bytes) -> list[EngineTensor]:
        """The I/O tensors of a serialized engine, in the engine's order."""
        import tensorrt as trt

        engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(data)
        if engine is None:
            raise HybridStitchError("TensorRT could not deserialize the engine it just built (see its log above)")
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
            if list(got.shape) != list(want.shape) or got.dtype != want.dtype:
                raise HybridStitchError(
                    f"the engine's {kind} {got.name!r} ({want.name}) is {got.dtype} {list(got.shape)}, the graph's is "
                    f"{want.dtype} {want.shape}"
                )
            mapping[want.name] = got.name
    return mapping


def _write_atomic(data: bytes, path: str) -> dict:
    """Write ``data`` to ``path`` through a temporary file in the same folder; returns its record."""
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".plan")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return dict(size=os.path.getsize(path), sha256=sha256_file(path))


def _link_or_copy(src: str, dst: str) -> None:
    """``dst`` becomes a hard link to ``src`` (a copy across file systems), atomically."""
    folder, name = os.path.split(dst)
    tmp = os.path.join(folder, f".tmp-{name}")
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
    target_dir = "/".join([TENSORRT_DIR, *bid.split("/")[:2]])
    if options.timing_cache is not None:
        timing = os.path.abspath(options.timing_cache)
    else:
        timing = f"{target_dir}/{TIMING_CACHE_NAME}"
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

    ``plan``: the :class:`~.onnx_export.ExportPlan` whose ONNX graphs are already in ``out``;
    ``loaders``: role -> :class:`~.onnx_export.DenoiserFromCheckpoint` (called only when a
    parity check or a Torch-TensorRT build needs the torch graph). Returns the build record.
    """
    from tqdm.auto import tqdm

    from .graphs import FullGraph, FullLargeGraph, GraphShapes, MaskedLargeGraph, example_inputs
    from .onnx_export import DTYPES

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
            from .torch_tensorrt_build import OP_PLUGIN

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
        if name.startswith(".tmp-"):
            os.unlink(os.path.join(build_dir, name))
    timing = build["timing_cache"] if os.path.isabs(build["timing_cache"]) else os.path.join(out, build["timing_cache"])
    os.makedirs(os.path.dirname(timing), exist_ok=True)
    changed = previous is None or previous.get("complete") is not True

    shapes = GraphShapes(manifest.batch, *manifest.latent_size, manifest.tokens["text"])
    graph_classes = {"small": FullGraph, "large": FullLargeGraph, "masked": MaskedLargeGraph}
    # every graph the folder serves: buckets built by earlier exports included
    for name in ["small", "large"] + [b["graph"] for b in manifest.buckets]:
        entry = manifest.graphs[name]
        role = "small" if entry.kind == "small" else "large"
        key = engine_key(entry, build)
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
                module_fn = _module_fn(loaders[role], graph_classes[entry.kind])
                example = example_inputs(entry.kind, manifest.spec(role), shapes, DTYPES[manifest.precision],
                                         entry.masked_tokens)
                bar.set_postfix_str("verify")
                _verify(section, entry, name, out, options, module_fn, example, manifest.precision)
                bar.update(1)
                bar.set_postfix_str("build")
                data = _build_one(toolchain, options, out, name, entry, module_fn, example, timing, plugin is not None)
                io_names = match_engine_io(entry, toolchain.engine_io(data), by_position=options.compiler != "onnx")
                bar.update(1)
                bar.set_postfix_str("save")
                record = _write_atomic(data, os.path.join(out, rel_file))
                build["engines"][name] = dict(file=rel_file, **record, key=key, onnx_sha256=onnx_sha256(entry),
                                                io_names=io_names, built=utc_now())
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


def _build_one(toolchain, options, out, name, entry, module_fn, example, timing, plugin: bool) -> bytes:
    if options.compiler == "torch-tensorrt":
        return toolchain.engine_from_torch(module_fn(), example, options, timing)
    src = os.path.join(out, entry.file)
    prepared = os.path.join(out, f".tmp-trt-{name}.{options.attention}.onnx")  # beside its external data
    try:
        TensorRTOnnxFromOnnx(src, prepared, options.attention)()
        return toolchain.engine_from_onnx(prepared, options, timing, plugin=plugin and bool(entry.custom_nodes))
    finally:
        if os.path.exists(prepared):
            os.unlink(prepared)


__all__ = [
    "ATTENTIONS",
    "COMPILERS",
    "DeviceInfo",
    "EngineBytesFromOnnx",
    "EngineTensor",
    "HARDWARE_COMPATIBILITY",
    "ParityFromOnnx",
    "TensorRTOnnxFromOnnx",
    "TensorRTOptions",
    "TensorRTToolchain",
    "build_engines",
    "build_id",
    "check_engine_file",
    "create_config_kwargs",
    "current_device",
    "match_engine_io",
    "reexport_command",
    "select_build",
    "why_build_cannot_run",
]
