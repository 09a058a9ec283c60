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
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
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

    @property
    def threads_per_block(self) -> int:
        return self.num_warps * 32

    def metadata(self) -> dict:
        """JSON-able description (everything but the code)."""
        meta = asdict(self)
        del meta["ptx"], meta["cubin"]
        meta["arg_names"] = list(self.arg_names)
        return meta


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
) -> AotKernel:
    """Compile the kernel for ``target`` ("sm_80", "sm_89", "sm_90") without a GPU.

    ``dtype`` is the element type of query/key/value/caches/out. Returns the TensorRT-ready
    PTX and, with ``assemble_cubin``, its cubin (a check that ptxas accepts the stripped PTX).
    """
    if target not in TARGETS:
        raise HybridStitchError(f"unknown target {target!r}; choose one of {sorted(TARGETS)}")
    import triton
    from triton.backends.compiler import GPUTarget

    config = config or (AOT_CONFIG_FP32 if dtype == "fp32" else AOT_CONFIG)
    fn = get_kernel()
    if not isinstance(fn, triton.runtime.JITFunction):
        # get_kernel() was first called with TRITON_INTERPRET=1: the kernel is an interpreter
        # object in this process, which cannot be compiled
        raise HybridStitchError("cannot AOT-compile in a process running Triton's interpreter (TRITON_INTERPRET=1)")
    sig = signature(dtype)
    constexprs = {
        "SM_SCALE": head_dim**-0.5,
        "HEAD_DIM": head_dim,
        "BLOCK_D": block_d(head_dim),
        "BLOCK_M": config.block_m,
        "BLOCK_N": config.block_n,
        "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32",
    }
    src = triton.compiler.ASTSource(
        fn=fn,
        signature={name: sig[name] for name in fn.arg_names},
        constexprs=constexprs,
        attrs=_divisibility_attrs(list(fn.arg_names), head_dim),
    )
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages, "enable_fp_fusion": True}
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
