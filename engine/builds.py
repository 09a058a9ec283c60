"""TensorRT engine builds as the runtime reads them: the build options, the GPU a build targets,
which build of an engine folder runs on this GPU, and why one cannot.

The builder (:mod:`hybridstitch.export.tensorrt_build`) writes the build records described there
into the manifest's ``tensorrt`` section; the TensorRT backend picks one with
:func:`select_build`. Everything here is pure (a manifest and a :class:`DeviceInfo` in, a
decision out), so the refusals are tested with fake devices; only :func:`current_device`
touches torch and TensorRT, lazily.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hybridstitch.errors import HybridStitchError

from .manifest import file_problem, sha256_json

COMPILERS = ("onnx", "torch-tensorrt")
ATTENTIONS = ("plugin", "standard")
HARDWARE_COMPATIBILITY = ("none", "ampere_plus", "same_compute_capability")
VERIFY = ("onnxruntime", "none")
TENSORRT_DIR = "tensorrt"
TIMING_CACHE_NAME = "timing.cache"
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
    driver_cuda: tuple[int, int] | None = None  # the NVIDIA driver's CUDA version: the PTX it can load

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
        raise HybridStitchError("TensorRT is not installed: pip install hybridstitch[gpu] (tensorrt >= 10.9)") from e
    from hybridstitch.plugins.aot import driver_cuda_version
    from hybridstitch.plugins.tensorrt_plugin import require_supported_tensorrt

    require_supported_tensorrt(tensorrt.__version__)
    props = torch.cuda.get_device_properties(index)
    return DeviceInfo(name=props.name, compute_capability=(props.major, props.minor),
                      tensorrt_version=tensorrt.__version__, driver_cuda=driver_cuda_version())


# -- naming and refusals (pure) ----------------------------------------------------------------------------


def gpu_slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``: a GPU model as a folder name."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def build_target(device: DeviceInfo, hardware_compatibility: str) -> str:
    """The folder a build's engines go to for this GPU: ``sm90-nvidia-h200`` (engines for this GPU
    model: GPUs of one compute capability do not share engines or timing caches),
    ``sm90-samecc`` (hardware compatibility "same_compute_capability") or ``ampere_plus``."""
    if hardware_compatibility == "ampere_plus":
        return "ampere_plus"
    if hardware_compatibility == "same_compute_capability":
        return f"{device.sm}-samecc"
    return f"{device.sm}-{gpu_slug(device.name)}"


def build_id(device: DeviceInfo, options: TensorRTOptions) -> str:
    """``sm89-nvidia-rtx-6000-ada-generation/trt10.9.0.34/onnx-plugin``: target, TensorRT version,
    compiler and attention."""
    target = build_target(device, options.hardware_compatibility)
    return f"{target}/trt{device.tensorrt_version}/{options.compiler}-{options.attention}"


def timing_cache_path(device: DeviceInfo) -> str:
    """The engine folder's timing cache for this GPU model and TensorRT version (relative path): one
    per GPU model even for hardware-compatible builds, whose tactics are still timed on this GPU."""
    return f"{TENSORRT_DIR}/timing/{device.sm}-{gpu_slug(device.name)}/trt{device.tensorrt_version}/{TIMING_CACHE_NAME}"


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
    elif hw == "none" and build.get("gpu") != device.name:
        return (
            f"built on {where} without hardware compatibility; this GPU is {device.name}: such engines and their "
            "tactics are tied to the GPU model that built them (or export with --hardware-compatibility "
            "same_compute_capability)"
        )
    plugin = build.get("plugin")
    if plugin and not _ptx_runs_on(plugin["ptx_target"], have):
        return f"its attention plugin holds {plugin['ptx_target']} PTX, which does not run on compute capability {cc}"
    if plugin and plugin.get("implementation") == "aot":
        from hybridstitch.plugins.aot import why_ptx_cannot_load

        if not plugin.get("ptx_version"):
            # built before the PTX version was pinned: Triton's newest ISA, which new drivers may refuse
            return "its attention plugin's PTX ISA version is not recorded (an engine of an older hybridstitch): rebuild it"
        if device.driver_cuda is not None:
            why = why_ptx_cannot_load(plugin["ptx_version"], device.driver_cuda)
            if why is not None:
                return why
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


# -- optimization profiles ------------------------------------------------------------------------------

# One profile: each symbolic dimension of the engine's inputs at a size (a static profile, min = opt
# = max, so every bucket keeps static-shape kernels) or over [min, opt, max] (Torch-TensorRT, which
# builds one profile).
EngineProfile = dict[str, "int | list[int]"]


def profile_batches(max_batch: int) -> list[int]:
    """The batches (rows, CFG included) TensorRT builds profiles for: 1, 2, 4, ... up to and with
    ``max_batch``; a batch in between runs padded up to the next one."""
    batches = {max_batch}
    b = 1
    while b < max_batch:
        batches.add(b)
        b *= 2
    return sorted(batches)


def engine_profiles(manifest, name: str) -> list[EngineProfile]:
    """The optimization profiles TensorRT builds for graph ``name`` of ``manifest``: the small
    engine at each profile batch; the large engine at each batch and each bucket's k, then k = N
    for the full step. One engine holds them all with one copy of the weights."""
    batches = profile_batches(manifest.batch)
    if name == "small":
        return [{"batch": b} for b in batches]
    n = manifest.tokens["image"]
    ks = sorted({b.masked_tokens for b in manifest.buckets} | {n})
    return [{"batch": b, "k": k} for b in batches for k in ks]


def profile_covers(profile: EngineProfile, sizes: dict[str, int]) -> bool:
    """Whether ``profile`` runs the symbolic ``sizes`` (``{"batch": B, "k": k}``)."""
    for name, value in sizes.items():
        want = profile.get(name)
        if want is None:
            continue
        lo, hi = (want, want) if isinstance(want, int) else (want[0], want[-1])
        if not lo <= value <= hi:
            return False
    return True


def profile_shapes(entry, profile: EngineProfile) -> dict[str, tuple[list[int], list[int], list[int]]]:
    """``{input name: (min, opt, max) shape}`` of every input of ``entry`` (a manifest graph entry)
    with a symbolic dimension, under ``profile``."""
    def at(which: int) -> dict[str, int]:
        return {k: (v if isinstance(v, int) else v[which]) for k, v in profile.items()}

    out = {}
    for t in entry.inputs:
        if any(isinstance(d, str) for d in t.shape):
            out[t.name] = (t.resolve(at(0)), t.resolve(at(1)), t.resolve(at(-1)))
    return out


def shape_matches(engine_shape, planned) -> bool:
    """An engine's I/O shape (-1 for a dynamic dimension) against the manifest's (a symbol's name there)."""
    return len(engine_shape) == len(planned) and all(
        (g == -1) if isinstance(w, str) else (g == w) for g, w in zip(engine_shape, planned))


def check_engine_file(folder: str, record: dict, hash_files: bool = True, verifier=None) -> str | None:
    """Why an engine file is not as built (None when it is). Reads only (and hashes only a moved file)."""
    return file_problem(folder, record["file"], record["size"], record["sha256"], hash_files, recorded_at="build",
                        stat=record.get("stat"), verifier=verifier)


def onnx_sha256(entry) -> str:
    """One hash over a graph's ONNX files (the .onnx and its external data) as recorded at export."""
    return sha256_json([(f["name"], f["sha256"]) for f in entry.files])


@dataclass(frozen=True)
class EngineTensor:
    """One I/O tensor of a built engine."""

    name: str
    is_input: bool
    shape: tuple[int, ...]
    dtype: str  # ONNX element type name (DTYPE_NAMES)


__all__ = [
    "ATTENTIONS",
    "COMPILERS",
    "DTYPE_NAMES",
    "DeviceInfo",
    "EngineTensor",
    "HARDWARE_COMPATIBILITY",
    "TENSORRT_DIR",
    "TIMING_CACHE_NAME",
    "TensorRTOptions",
    "VERIFY",
    "build_id",
    "build_target",
    "EngineProfile",
    "check_engine_file",
    "engine_profiles",
    "profile_batches",
    "profile_covers",
    "profile_shapes",
    "shape_matches",
    "current_device",
    "onnx_sha256",
    "ptx_target",
    "reexport_command",
    "gpu_slug",
    "select_build",
    "timing_cache_path",
    "why_build_cannot_run",
]
