"""Ahead-of-time compile of the cached-KV attention Triton kernel to PTX (and cubin), no GPU needed.

TensorRT's AOT Python plugin (``plugins/tensorrt_plugin.py``) embeds this PTX in the engine,
so an engine runs without Python or Triton. Compiling needs only the ``triton`` wheel: it
bundles LLVM's NVPTX back end and ``ptxas``; no CUDA driver is touched when the target is
named explicitly.

Kernel ABI for TensorRT: TensorRT launches a plugin kernel with (input pointers..., extra
int32 arguments..., output pointers...) and nothing else, which is why the kernel's
parameters are in that order (:data:`.triton_kernel.INPUT_POINTERS` etc.). Recent Triton
(3.9 here) appends two runtime parameters of its own to every entry (``global_scratch``,
``profile_scratch``) that TensorRT would not pass; :func:`strip_runtime_params` removes them
after checking that the kernel body never reads them.

PTX ISA version. TensorRT hands the PTX to the CUDA driver, which JIT-compiles it when the
engine is loaded, and a driver refuses PTX newer than its own CUDA version knows
(``CUDA_ERROR_UNSUPPORTED_PTX_VERSION``). By default Triton stamps the newest version its
bundled ``ptxas`` accepts (3.9: 9.4 for sm_90, 8.8 for sm_80/89; 3.6: 8.7), which a CUDA 13.0
driver (580.x, PTX <= 9.0) already refuses. So the kernel is compiled with Triton's
``ptx_version`` option set to :data:`PTX_VERSION` (8.0: the lowest that has sm_90a, loaded by
every CUDA 12.0+ driver; the machine code ptxas makes from it was checked to be the same as
from Triton's default for all three targets), the build records it
(:func:`hybridstitch.plugins.tensorrt_plugin.plugin_record`), and loading refuses an engine
whose PTX the driver cannot JIT (:func:`why_ptx_cannot_load`).
"""

from __future__ import annotations

import ctypes
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from hybridstitch.errors import HybridStitchError

from .triton_kernel import (
    CONSTEXPR_ARGS,
    INPUT_POINTERS,
    INT_ARGS,
    OUTPUT_POINTERS,
    KernelConfig,
    block_d,
    get_kernel,
)

# Named targets -> CUDA compute capability (A100, RTX 6000 Ada, H100; DESIGN.md section 1).
TARGETS = {"sm_80": 80, "sm_89": 89, "sm_90": 90}
DTYPES = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}

# Tile config for the engines: two pipeline stages keep shared memory at or under 48 KiB on
# every target (32 KiB on sm_80/89, 48 KiB on sm_90 for fp16 head_dim 64). Above 48 KiB a
# launcher must raise the kernel's dynamic shared-memory limit first, and TensorRT's AOT
# plugin launch is not documented to do that.
AOT_CONFIG = KernelConfig(block_m=128, block_n=64, num_warps=4, num_stages=2)
# fp32 ("ieee" FMA dot products, 4-byte tiles) needs smaller tiles to stay under the limit.
AOT_CONFIG_FP32 = KernelConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
SHARED_MEM_LIMIT = 48 * 1024
# Query-block splits per (batch, head): grid_y of the TensorRT launch (see triton_kernel's
# module docstring). Fixed at build time because the launch grid is a symbolic expression
# of the input shapes; 4 gives B*H*4 = 304 programs for SD3.5 Large at batch 2 (CFG).
AOT_SPLITS = 4

# PTX ISA version stamped on the AOT PTX, as Triton's ``ptx_version`` option counts it (10 *
# major + minor): 8.0, the first with sm_90a (Hopper wgmma), so every CUDA 12.0+ driver can
# JIT it (see the module docstring).
PTX_VERSION = 80
# Below these LLVM's NVPTX back end aborts the whole process (not an exception) for the target.
MIN_PTX_VERSION = {"sm_80": 70, "sm_89": 78, "sm_90": 80}


@dataclass(frozen=True)
class AotKernel:
    """One compiled kernel: what TensorRT needs to launch it, and how it was made."""

    target: str  # "sm_80" | "sm_89" | "sm_90"
    dtype: str  # "fp16" | "bf16" | "fp32" (query/key/value/caches/out)
    head_dim: int
    kernel_name: str
    ptx: str  # TensorRT-ready: Triton's trailing runtime parameters removed
    cubin: bytes | None  # ptxas output of that same PTX; None when assemble=False
    num_warps: int
    num_stages: int
    shared_mem: int  # bytes of dynamic shared memory per program
    block_m: int
    block_n: int
    arg_names: tuple[str, ...]  # kernel parameters in launch order
    ptx_version: str = "8.0"  # PTX ISA version of ``ptx`` (its .version line)

    @property
    def threads_per_block(self) -> int:
        return self.num_warps * 32

    def constexprs(self) -> dict:
        """The compile-time constants the PTX was specialised for (the kernel's constexpr parameters)."""
        return kernel_constexprs(self.dtype, self.head_dim, KernelConfig(self.block_m, self.block_n, self.num_warps, self.num_stages))

    def metadata(self) -> dict:
        """JSON-able description (everything but the code)."""
        meta = asdict(self)
        del meta["ptx"], meta["cubin"]
        meta["arg_names"] = list(self.arg_names)
        return meta


def kernel_constexprs(dtype: str, head_dim: int, config: KernelConfig) -> dict:
    """The kernel's constexpr arguments for ``dtype`` / ``head_dim`` / tile ``config`` (CONSTEXPR_ARGS)."""
    return {
        "SM_SCALE": head_dim**-0.5,
        "HEAD_DIM": head_dim,
        "BLOCK_D": block_d(head_dim),
        "BLOCK_M": config.block_m,
        "BLOCK_N": config.block_n,
        "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32",
    }


def signature(dtype: str) -> dict[str, str]:
    """Triton signature of the kernel: pointer element types, int32 sizes/strides, constexprs."""
    if dtype not in DTYPES:
        raise HybridStitchError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    sig = {name: f"*{dtype}" for name in INPUT_POINTERS + OUTPUT_POINTERS}
    sig["IDX"] = "*i64"
    sig.update({name: "i32" for name in INT_ARGS})
    sig.update({name: "constexpr" for name in CONSTEXPR_ARGS})
    return sig


def _divisibility_attrs(arg_names: list[str], head_dim: int) -> dict:
    """Alignment facts Triton would find by itself at JIT time, stated for the AOT build so
    the loads vectorise (16-byte accesses and cp.async instead of scalar loads): TensorRT
    buffers are at least 256-byte aligned, and with contiguous tensors every stride is a
    multiple of head_dim."""
    aligned = [i for i, name in enumerate(arg_names) if name in INPUT_POINTERS + OUTPUT_POINTERS]
    if head_dim % 16 == 0:
        aligned += [i for i, name in enumerate(arg_names) if name.startswith("stride_") and name != "stride_ib"]
    return {(i,): [["tt.divisibility", 16]] for i in sorted(aligned)}


def strip_runtime_params(ptx: str, kernel_name: str, num_args: int) -> str:
    """Drop the entry parameters after the first ``num_args`` (Triton's scratch pointers).

    Raises if the kernel body reads any of them: then the kernel needs scratch memory that
    TensorRT would not provide, and stripping would break it.
    """
    entry = re.search(rf"\.entry\s+{re.escape(kernel_name)}\s*\((.*?)\)", ptx, re.S)
    if entry is None:
        raise HybridStitchError(f"no .entry {kernel_name} in the PTX; was it compiled from this kernel?")
    params = [p.strip() for p in entry.group(1).split(",") if p.strip()]
    if len(params) < num_args:
        raise HybridStitchError(f"{kernel_name} has {len(params)} PTX parameters, expected at least {num_args}")
    extra = params[num_args:]
    body = ptx[entry.end() :]
    for param in extra:
        name = param.split()[-1]
        if re.search(rf"\[{re.escape(name)}\]", body):
            raise HybridStitchError(
                f"{kernel_name} reads its runtime parameter {name} (Triton scratch memory), which a "
                "TensorRT plugin launch does not pass; use a tile config without scratch memory"
            )
    kept = ",\n\t".join(params[:num_args])
    return ptx[: entry.start(1)] + "\n\t" + kept + "\n" + ptx[entry.end(1) :]


def ptx_target(ptx: str) -> str:
    """The ``.target`` of a PTX module, e.g. ``sm_90a``."""
    found = re.search(r"^\s*\.target\s+(\w+)", ptx, re.M)
    if found is None:
        raise HybridStitchError("the PTX has no .target directive")
    return found.group(1)


def ptx_isa_version(ptx: str) -> tuple[int, int]:
    """The ``.version`` of a PTX module as (major, minor), e.g. (8, 0)."""
    found = re.search(r"^\s*\.version\s+(\d+)\.(\d+)", ptx, re.M)
    if found is None:
        raise HybridStitchError("the PTX has no .version directive")
    return int(found.group(1)), int(found.group(2))


def _version_pair(value, what: str) -> tuple[int, int]:
    """(major, minor) from "8.0", (8, 0), or a CUDA version integer 13000 / 12080 as cuDriverGetVersion gives."""
    if isinstance(value, int):
        return (value // 1000, (value % 1000) // 10) if value >= 1000 else (value // 10, value % 10)
    if isinstance(value, str):
        parts = value.strip().split(".")
        if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit():
            return int(parts[0]), int(parts[1])
    elif isinstance(value, (tuple, list)) and len(value) >= 2:
        return int(value[0]), int(value[1])
    raise HybridStitchError(f"cannot read a {what} version from {value!r}; give 'MAJOR.MINOR', (major, minor) or e.g. 13000")


# Newest PTX ISA each CUDA release's driver JIT-compiles (NVIDIA's PTX ISA release history).
# CUDA 12.6 stayed at 8.5 and there was no public 12.7; 13.x follows 9.x (13.0: 9.0).
_PTX_OF_CUDA = {(12, 0): (8, 0), (12, 1): (8, 1), (12, 2): (8, 2), (12, 3): (8, 3), (12, 4): (8, 4), (12, 5): (8, 5),
                (12, 6): (8, 5), (12, 8): (8, 7), (12, 9): (8, 8)}


def max_ptx_version(driver_cuda) -> tuple[int, int]:
    """The newest PTX ISA version a driver of CUDA version ``driver_cuda`` (e.g. (13, 0), 13000) loads."""
    major, minor = _version_pair(driver_cuda, "CUDA driver")
    if (major, minor) in _PTX_OF_CUDA:
        return _PTX_OF_CUDA[(major, minor)]
    if major == 12 and minor == 7:
        return (8, 6)
    if major >= 13:
        return (9 + (major - 13), minor)
    if major == 11:
        return (7, minor)
    if major == 12:  # a 12.x after 12.9 (none known): at least what 12.9 loads
        return (8, 8)
    raise HybridStitchError(f"CUDA {major}.{minor} is older than any driver the TensorRT path supports (CUDA 12.0+)")


def why_ptx_cannot_load(ptx_version, driver_cuda) -> str | None:
    """Why a driver of CUDA version ``driver_cuda`` cannot load PTX of ISA ``ptx_version`` (None: it can).

    ``ptx_version``: "8.0" or (8, 0), as the manifest's plugin record has it; ``driver_cuda``: the
    driver's CUDA version, (13, 0) / "13.0" / 13000 (:func:`driver_cuda_version`). The engine's
    plugin kernel is PTX that the driver JIT-compiles at load; a newer ISA fails there with
    ``CUDA_ERROR_UNSUPPORTED_PTX_VERSION``.
    """
    want = _version_pair(ptx_version, "PTX ISA")
    have = _version_pair(driver_cuda, "CUDA driver")
    top = max_ptx_version(have)
    if want <= top:
        return None
    return (
        f"its attention plugin holds PTX ISA {want[0]}.{want[1]}, and this machine's NVIDIA driver (CUDA {have[0]}.{have[1]}) "
        f"loads PTX up to {top[0]}.{top[1]}: update the driver, or rebuild the engines with this package's default "
        f"PTX version ({PTX_VERSION // 10}.{PTX_VERSION % 10})"
    )


def driver_cuda_version() -> tuple[int, int] | None:
    """The installed NVIDIA driver's CUDA version, e.g. (13, 0) for a 580.x driver; None without a driver.

    Read from ``libcuda`` (``cuDriverGetVersion``) with ctypes, so it needs neither torch nor a
    CUDA toolkit: it is the driver, not the toolkit torch was built with, that JIT-compiles PTX.
    """
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        version = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(version)) == 0 and version.value > 0:
            return _version_pair(version.value, "CUDA driver")
    return None


def ptx_param_count(ptx: str, kernel_name: str) -> int:
    entry = re.search(rf"\.entry\s+{re.escape(kernel_name)}\s*\((.*?)\)", ptx, re.S)
    if entry is None:
        raise HybridStitchError(f"no .entry {kernel_name} in the PTX")
    return len([p for p in entry.group(1).split(",") if p.strip()])


def _ptxas_path(capability: int) -> str:
    """The ptxas Triton itself uses (bundled in the wheel; TRITON_PTXAS_PATH overrides)."""
    from triton.backends.nvidia import compiler

    if hasattr(compiler, "get_ptxas"):  # 3.9 (checked): a ptxas per architecture family
        return compiler.get_ptxas(capability).path
    from triton import knobs  # earlier 3.x releases (not checked here)

    return knobs.nvidia.ptxas.path


def assemble(ptx: str, target: str) -> bytes:
    """ptxas (the one bundled in the triton wheel) on ``ptx``; returns the cubin."""
    ptxas = _ptxas_path(TARGETS[target])
    arch = ptx_target(ptx)  # sm_90a for Hopper: Triton's wgmma code needs the "a" features
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "kernel.ptx", Path(tmp) / "kernel.cubin"
        src.write_text(ptx)
        result = subprocess.run(
            [ptxas, f"--gpu-name={arch}", str(src), "-o", str(out)], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise HybridStitchError(f"ptxas failed for {target} ({arch}):\n{result.stderr.strip()}")
        return out.read_bytes()


def compile_for_target(
    target: str,
    *,
    dtype: str = "fp16",
    head_dim: int = 64,
    config: KernelConfig | None = None,
    assemble_cubin: bool = True,
    ptx_version: int | None = PTX_VERSION,
) -> AotKernel:
    """Compile the kernel for ``target`` ("sm_80", "sm_89", "sm_90") without a GPU.

    ``dtype`` is the element type of query/key/value/caches/out. Returns the TensorRT-ready
    PTX and, with ``assemble_cubin``, its cubin (a check that ptxas accepts the stripped PTX).
    ``ptx_version`` (10 * major + minor) is the PTX ISA version stamped on the PTX; None leaves
    Triton's default, the newest its ptxas knows, which older drivers refuse.
    """
    if target not in TARGETS:
        raise HybridStitchError(f"unknown target {target!r}; choose one of {sorted(TARGETS)}")
    if ptx_version is not None and ptx_version < MIN_PTX_VERSION[target]:
        # checked here: LLVM would abort the process rather than raise
        minimum = MIN_PTX_VERSION[target]
        raise HybridStitchError(
            f"PTX ISA {ptx_version // 10}.{ptx_version % 10} cannot express {target} code; use {minimum // 10}.{minimum % 10} or newer"
        )
    import triton
    from triton.backends.compiler import GPUTarget

    config = config or (AOT_CONFIG_FP32 if dtype == "fp32" else AOT_CONFIG)
    fn = get_kernel()
    if not isinstance(fn, triton.runtime.JITFunction):
        # get_kernel() was first called with TRITON_INTERPRET=1: the kernel is an interpreter
        # object in this process, which cannot be compiled
        raise HybridStitchError("cannot AOT-compile in a process running Triton's interpreter (TRITON_INTERPRET=1)")
    sig = signature(dtype)
    constexprs = kernel_constexprs(dtype, head_dim, config)
    src = triton.compiler.ASTSource(
        fn=fn,
        signature={name: sig[name] for name in fn.arg_names},
        constexprs=constexprs,
        attrs=_divisibility_attrs(list(fn.arg_names), head_dim),
    )
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages, "enable_fp_fusion": True}
    if ptx_version is not None:
        options["ptx_version"] = ptx_version
    compiled = triton.compile(src, target=GPUTarget("cuda", TARGETS[target], 32), options=options)

    meta = compiled.metadata
    if getattr(meta, "global_scratch_size", 0) or getattr(meta, "profile_scratch_size", 0):
        raise HybridStitchError(f"the {target} build needs Triton scratch memory, which a TensorRT plugin cannot give")
    if meta.shared > SHARED_MEM_LIMIT:
        raise HybridStitchError(
            f"the {target} {dtype} build needs {meta.shared} bytes of shared memory, over the "
            f"{SHARED_MEM_LIMIT} a TensorRT plugin launch can count on; pass a smaller KernelConfig"
        )
    arg_names = tuple(name for name in fn.arg_names if sig[name] != "constexpr")
    ptx = strip_runtime_params(compiled.asm["ptx"], meta.name, len(arg_names))
    isa = ptx_isa_version(ptx)
    if ptx_version is not None and isa != (ptx_version // 10, ptx_version % 10):
        raise HybridStitchError(
            f"Triton {triton.__version__} stamped PTX ISA {isa[0]}.{isa[1]}, not the {ptx_version // 10}.{ptx_version % 10} "
            "asked for (its ptx_version option); use a Triton release that honours it"
        )
    return AotKernel(
        target=target,
        dtype=dtype,
        head_dim=head_dim,
        kernel_name=meta.name,
        ptx=ptx,
        cubin=assemble(ptx, target) if assemble_cubin else None,
        num_warps=meta.num_warps,
        num_stages=config.num_stages,
        shared_mem=meta.shared,
        block_m=config.block_m,
        block_n=config.block_n,
        arg_names=arg_names,
        ptx_version=f"{isa[0]}.{isa[1]}",
    )


def write_kernel(kernel: AotKernel, out_dir: str | Path) -> list[Path]:
    """Write ``<name>.<target>.<dtype>.hd<D>.{ptx,cubin,json}`` under ``out_dir``; returns the paths."""
    import json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{kernel.kernel_name}.{kernel.target}.{kernel.dtype}.hd{kernel.head_dim}"
    paths = [out_dir / f"{stem}.ptx", out_dir / f"{stem}.json"]
    paths[0].write_text(kernel.ptx)
    paths[1].write_text(json.dumps(kernel.metadata(), indent=2) + "\n")
    if kernel.cubin is not None:
        paths.append(out_dir / f"{stem}.cubin")
        paths[-1].write_bytes(kernel.cubin)
    return paths


def read_kernel(json_path: str | Path) -> AotKernel:
    """The kernel :func:`write_kernel` wrote: ``<stem>.json`` and the ``.ptx`` (and ``.cubin``) beside it."""
    import json

    json_path = Path(json_path)
    meta = json.loads(json_path.read_text())
    known = {f.name for f in fields(AotKernel)} - {"ptx", "cubin"}
    meta = {k: v for k, v in meta.items() if k in known}
    meta["arg_names"] = tuple(meta["arg_names"])
    cubin = json_path.with_suffix(".cubin")
    return AotKernel(ptx=json_path.with_suffix(".ptx").read_text(), cubin=cubin.read_bytes() if cubin.is_file() else None, **meta)
