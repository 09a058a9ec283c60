"""The GPU suite: every check this project wants from a GPU, in one command that installs nothing.

    python benchmarks/gpu_suite.py --out DIR                    # all parts, <= 6 minutes on an H200
    python benchmarks/gpu_suite.py --out DIR --parts kernel,aot
    python benchmarks/gpu_suite.py --out DIR --dry-run          # CPU, tiny sizes: checks the wiring

Needs the package installed (``pip install --no-deps --no-build-isolation -e .``: the
``hybridstitch.*`` subpackages exist only through that install's folder mapping) and writes only
under ``--out``. docs/gpu.md has the exact command for a lent GPU machine.

Parts (``--parts``), each run in its own Python process with its own time limit, so a crashed
CUDA context or a hung part costs that part only; a part that reaches its limit stops starting
new measurements and writes what it has (killed ``--grace-s`` later if it does not):

``kernel``   the Triton kernel of ``hybridstitch::CachedKVAttention`` against PyTorch (in-place
             scatter + cat + SDPA) at SD3.5 Large sizes, fp16 and bf16: parity with an fp32
             reference, exact cache rows, and speed for several tile configs;
``aot``      the AOT PTX the TensorRT plugin embeds, loaded by the CUDA driver (as TensorRT does)
             and launched the way TensorRT launches it: plugin inputs, the extra int32 arguments,
             plugin outputs, with the cache outputs aliased to the cache inputs, the AOT grid and
             block -- all computed by ``plugins/tensorrt_plugin.py`` (:func:`aot_launch`,
             :func:`tensorrt_kernel_arguments`), the code ``aot_impl`` runs. Checks the plugin's
             launch ABI and PTX version without TensorRT; also times sm_80 PTX (what
             ``--hardware-compatibility ampere_plus`` engines embed) on this GPU;
``masked``   the masked large forward of SD3.5 Large (random weights) per bucket against the full
             forward, fp16 and bf16, 768x768 and 1024x1024, CFG batch 2, eager and replayed as
             CUDA graphs: its cost ratio t_l(r)/t_l against the ideal (k+T)/(N+T), and the bound
             t_l(r) + t_s < t_l with SD3 Medium's t_s;
``e2e``      end-to-end latency with replayed schedules at real shapes (large, small, T-Stitch,
             SRDiffusion, HybridStitch-10..40): speed-up over large-only and the latency model's
             prediction (Eqs. 3-8) from the measured per-call latencies;
``memory``   device memory of the torch path against the export's memory plan -- skipped until
             ``hybridstitch.export`` offers ``memory_plan`` (the hook: :func:`part_memory`);
``batching`` step-level batching throughput at 1, 2, 4, 8 requests -- skipped until a step
             scheduler exists (the hook: :func:`part_batching`).

Writes ``DIR/<part>.json`` and ``DIR/<part>.md`` (a Markdown table) per part, ``DIR/<part>.log``
(the part's output), and ``DIR/summary.md`` / ``summary.json``. Exit status: 0 when no part
failed (skipped and time-limited parts included), 1 when one did, 2 on bad usage or no GPU.

``--dry-run`` runs every part on the CPU at tiny sizes in seconds (the Triton kernel under
``TRITON_INTERPRET=1``, fp16 and fp32 since the interpreter cannot do bf16 dots, the AOT
launch through the interpreter instead of the driver, no CUDA graphs): its numbers mean nothing,
its files and statuses show that every part runs end to end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from datetime import datetime, timezone

try:
    from hybridstitch.errors import HybridStitchError
    from hybridstitch.fileio import atomic_write_text
except ImportError as missing:  # run from a checkout that was never installed
    sys.exit(
        f"gpu_suite: cannot import hybridstitch ({missing}). Install the package first, from the repository root: "
        "pip install --no-deps --no-build-isolation -e .  (docs/gpu.md)"
    )

# -- the parts -------------------------------------------------------------------------------------------

# name -> (share of the time budget, title). Shares follow the expected run times on an H200
# (docs/gpu.md: model building, CUDA graph capture and the 50-step end-to-end runs dominate).
PARTS = {
    "kernel": (45, "Triton cached-KV attention kernel vs PyTorch SDPA"),
    "aot": (30, "AOT PTX launched through the CUDA driver the way TensorRT launches it"),
    "masked": (110, "Masked large forward vs the full forward"),
    "e2e": (125, "End-to-end replayed latency and the latency model"),
    "memory": (10, "Device memory of the torch path vs the export's memory plan"),
    "batching": (10, "Step-level batching throughput"),
}
DEFAULT_BUDGET_S = 330.0  # + worker start-up and grace: under 6 minutes on an H200
STATUS_OK = ("passed", "skipped", "partial")

# diffusers configs of the real transformers (stabilityai/stable-diffusion-3.5-large, -3-medium)
SD35_LARGE = dict(num_layers=38, num_attention_heads=38, attention_head_dim=64, caption_projection_dim=2432,
                  qk_norm="rms_norm", joint_attention_dim=4096, pooled_projection_dim=2048, pos_embed_max_size=192)
SD3_MEDIUM = dict(num_layers=24, num_attention_heads=24, attention_head_dim=64, caption_projection_dim=1536,
                  qk_norm=None, joint_attention_dim=4096, pooled_projection_dim=2048, pos_embed_max_size=192)
TINY_LARGE = dict(num_layers=2, num_attention_heads=4, attention_head_dim=8, caption_projection_dim=32,
                  qk_norm="rms_norm", joint_attention_dim=32, pooled_projection_dim=16, pos_embed_max_size=16)
TINY_SMALL = dict(num_layers=1, num_attention_heads=2, attention_head_dim=8, caption_projection_dim=16,
                  qk_norm=None, joint_attention_dim=32, pooled_projection_dim=16, pos_embed_max_size=16)
TEXT_TOKENS = 333  # 77 CLIP + 256 T5
BUCKETS = (0.1, 0.2, 0.3, 0.4)
# Max |out - fp32 reference|: the kernel rounds softmax weights to the input dtype before P @ V
# (as FlashAttention does), ~2^-11 relative in fp16, ~2^-8 in bf16; outputs are O(1).
TOLERANCE = {"float16": 4e-3, "bfloat16": 3e-2, "float32": 1e-4}


class Context:
    """What a part gets: the options, its device and its clock."""

    def __init__(self, args, deadline: float):
        self.args = args
        self.dry_run = args.dry_run
        self.deadline = deadline

    def left(self) -> float:
        return self.deadline - time.time()

    @property
    def device(self):
        import torch

        return torch.device("cpu" if self.dry_run else "cuda")

    @property
    def cuda(self) -> bool:
        return not self.dry_run


class PartReport:
    """One part's results, saved (JSON + Markdown) after every row, so a part stopped from outside
    leaves what it had measured."""

    def __init__(self, name: str, out_dir: str, dry_run: bool, limit_s: float):
        self.name, self.out_dir = name, out_dir
        self.data = {"part": name, "title": PARTS[name][1], "status": "running", "reason": None, "dry_run": dry_run,
                     "started": utc_now(), "seconds": 0.0, "limit_s": limit_s, "env": {}, "rows": [], "notes": []}
        self._t0 = time.time()

    def __getitem__(self, key):
        return self.data[key]

    def __setitem__(self, key, value):
        self.data[key] = value

    def add(self, row: dict) -> None:
        self.data["rows"].append(row)
        self.save()

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        self.save()

    def finish(self, status: str, reason: str | None = None) -> None:
        self.data["status"], self.data["reason"] = status, reason
        self.save()

    def save(self) -> None:
        self.data["seconds"] = round(time.time() - self._t0, 2)
        write_part(self.out_dir, self.data)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_part(out_dir: str, data: dict) -> None:
    atomic_write_text(os.path.join(out_dir, f"{data['part']}.json"), json.dumps(data, indent=2, default=str) + "\n")
    atomic_write_text(os.path.join(out_dir, f"{data['part']}.md"), render_part(data))


def environment(cuda: bool) -> dict:
    """Versions and the device, for every part's header."""
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("triton", "diffusers", "cupy", "numpy"):
        try:
            env[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 -- an absent or broken optional package is just reported
            env[name] = None
    env["device"] = torch.cuda.get_device_name() if cuda else "CPU (dry run)"
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env["compute_capability"] = f"{props.major}.{props.minor}"
        env["multiprocessors"] = props.multi_processor_count
        env["memory_gib"] = round(props.total_memory / 2**30, 1)
        from hybridstitch.plugins.aot import driver_cuda_version

        driver = driver_cuda_version()
        env["driver_cuda"] = f"{driver[0]}.{driver[1]}" if driver else None
    return env


# -- timing ------------------------------------------------------------------------------------------------


def time_call(fn, iters: int, warmup: int, cuda: bool) -> list[float]:
    """Seconds per call of ``fn()``: CUDA events around each call on a GPU, perf_counter on the CPU."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    if cuda:
        torch.cuda.synchronize()
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:600]


# -- part: kernel --------------------------------------------------------------------------------------------

# (label, block_m, block_n, num_warps, num_stages, splits); splits None = the launcher's choice
KERNEL_VARIANTS_GPU = [
    ("launcher default (128x64 w4 s3)", 128, 64, 4, 3, None),
    ("TensorRT AOT tiles (128x64 w4 s2, S=4)", 128, 64, 4, 2, 4),
    ("128x128 w8 s3", 128, 128, 8, 3, None),
]
KERNEL_VARIANTS_DRY = [("16x16, launcher splits", 16, 16, 1, 1, None), ("16x16, S=2", 16, 16, 1, 1, 2)]


def attention_inputs(b, h, n, t, d, k, dtype, device, seed):
    """query/key/value [B, H, k+T, D], caches [B, H, N, D], index [B, k] (a different mask per batch row)."""
    import torch

    # drawn on the device: a CPU generator would spend about a second per SD3.5-sized row
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    q, key, v = randn(b, h, k + t, d), randn(b, h, k + t, d), randn(b, h, k + t, d)
    cache_k, cache_v = randn(b, h, n, d), randn(b, h, n, d)
    g_cpu = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(n, generator=g_cpu)[:k] for _ in range(b)]).to(device)
    return q, key, v, cache_k, cache_v, index


def part_kernel(ctx: Context, report: PartReport) -> None:
    import torch
    import torch.nn.functional as F

    from hybridstitch.masks import tokens_for_ratio
    from hybridstitch.plugins.cached_kv import cached_kv_attention_reference
    from hybridstitch.plugins.torch_op import cached_kv_attention_op
    from hybridstitch.plugins.triton_kernel import KernelConfig, cached_kv_attention_triton, interpreter_problem

    if ctx.dry_run:
        if interpreter_problem():
            return report.finish("skipped", interpreter_problem())
        shapes, dtypes, ratios = [(2, 2, 45, 13, 16)], [torch.float16, torch.float32], (0.1, 0.3)
        variants, iters, warmup = KERNEL_VARIANTS_DRY, 2, 1
    else:
        shapes = [(2, 38, 2304, TEXT_TOKENS, 64), (2, 38, 4096, TEXT_TOKENS, 64)]  # 768^2 and 1024^2, CFG batch 2
        dtypes, ratios, variants = [torch.float16, torch.bfloat16], BUCKETS, KERNEL_VARIANTS_GPU
        iters, warmup = ctx.args.iters, 5
    report["sizes"] = [dict(B=b, H=h, N=n, T=t, D=d) for b, h, n, t, d in shapes]
    failed = False
    for dtype in dtypes:
        dname = str(dtype).removeprefix("torch.")
        for b, h, n, t, d in shapes:
            for ratio in ratios:
                if ctx.left() < (1 if ctx.dry_run else 4):
                    return report.finish("partial", "time limit reached; later rows not run")
                k = tokens_for_ratio(ratio, n)
                q, key, v, cache_k, cache_v, index = attention_inputs(b, h, n, t, d, k, dtype, ctx.device, seed=k)
                ref_out, ref_k, ref_v = cached_kv_attention_reference(
                    q.float(), key.float(), v.float(), cache_k.float(), cache_v.float(), index)  # fmt: skip
                row = {"dtype": dname, "ratio": ratio, "N": n, "k": k, "T": t, "variants": []}
                for label, bm, bn, warps, stages, splits in variants:
                    config = KernelConfig(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages)
                    ck, cv = cache_k.clone(), cache_v.clone()
                    try:
                        out, ck_out, cv_out = cached_kv_attention_triton(q, key, v, ck, cv, index, config=config, splits=splits)
                        err = (out.float() - ref_out).abs().max().item()
                        exact = bool(torch.equal(ck_out.float(), ref_k) and torch.equal(cv_out.float(), ref_v))
                        ok = err <= TOLERANCE[dname] and exact and ck_out is ck
                        # rewriting the same fresh rows: the in-place update is idempotent, so it can be timed
                        ms = 1e3 * statistics.median(time_call(
                            lambda: cached_kv_attention_triton(q, key, v, ck, cv, index, config=config, splits=splits),
                            iters, warmup, ctx.cuda))  # fmt: skip
                        row["variants"].append({"label": label, "ms": ms, "max_abs_err": err, "caches_exact": exact, "passed": ok})
                    except Exception as error:  # noqa: BLE001 -- one failing config must not hide the others
                        ok = False
                        row["variants"].append({"label": label, "error": error_text(error), "passed": False})
                    failed |= not ok
                op = cached_kv_attention_op(q, key, v, cache_k, cache_v, index)
                row["op_max_abs_err"] = (op[0].float() - ref_out).abs().max().item()
                failed |= row["op_max_abs_err"] > TOLERANCE[dname]
                row["op_ms"] = 1e3 * statistics.median(
                    time_call(lambda: cached_kv_attention_op(q, key, v, cache_k, cache_v, index), iters, warmup, ctx.cuda))
                ck, cv = cache_k.clone(), cache_v.clone()
                idx4 = index[:, None, :, None].expand(b, h, k, d)  # [B, H, k, D] for scatter_ on dim 2

                def baseline():
                    ck.scatter_(2, idx4, key[:, :, :k])
                    cv.scatter_(2, idx4, v[:, :, :k])
                    keys = torch.cat([ck, key[:, :, k:]], dim=2)  # [B, H, N + T, D]
                    values = torch.cat([cv, v[:, :, k:]], dim=2)
                    return F.scaled_dot_product_attention(q, keys, values)

                row["baseline_ms"] = 1e3 * statistics.median(time_call(baseline, iters, warmup, ctx.cuda))
                keys, values = torch.cat([ck, key[:, :, k:]], dim=2), torch.cat([cv, v[:, :, k:]], dim=2)
                row["sdpa_only_ms"] = 1e3 * statistics.median(
                    time_call(lambda: F.scaled_dot_product_attention(q, keys, values), iters, warmup, ctx.cuda))
                report.add(row)
    report.finish("failed" if failed else "passed", "a parity check failed (see the rows)" if failed else None)


def render_kernel(data: dict) -> list[str]:
    lines = [
        "Median ms per call. Baseline: in-place scatter + cat + PyTorch SDPA; SDPA only: over K/V already "
        "concatenated (the attention alone). Parity: max |out - fp32 reference| (tolerance "
        f"{', '.join(f'{k} {v:g}' for k, v in TOLERANCE.items())}), cache rows exact.",
        "",
        "| dtype | N | r | k | call | ms | vs baseline | max abs err | caches | pass |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        head = f"| {row['dtype']} | {row['N']} | {row['ratio']:.1f} | {row['k']} |"
        base = row.get("baseline_ms")
        for var in row["variants"]:
            if "error" in var:
                lines.append(f"{head} {var['label']} | ERROR: {var['error'][:160]} | | | | NO |")
                continue
            lines.append(f"{head} {var['label']} | {var['ms']:.3f} | {base / var['ms']:.2f}x | {var['max_abs_err']:.2e} | "
                         f"{'exact' if var['caches_exact'] else 'DIFFER'} | {'yes' if var['passed'] else 'NO'} |")
        lines.append(f"{head} torch.ops (clones + kernel) | {row['op_ms']:.3f} | {base / row['op_ms']:.2f}x | "
                     f"{row['op_max_abs_err']:.2e} | | |")
        lines.append(f"{head} baseline | {base:.3f} | 1.00x | | | |")
        lines.append(f"{head} SDPA only | {row['sdpa_only_ms']:.3f} | {base / row['sdpa_only_ms']:.2f}x | | | |")
    return lines


# -- part: aot ---------------------------------------------------------------------------------------------

_COMPILE_CHILD = r"""
import json, sys
from hybridstitch.plugins.aot import compile_for_target, write_kernel
spec = json.loads(sys.argv[1])
paths = [str(write_kernel(compile_for_target(t, dtype=d, head_dim=spec["head_dim"], assemble_cubin=False), spec["dir"])[1])
         for t, d in spec["kernels"]]
print("PATHS" + json.dumps(paths))
"""


def compile_aot_kernels(kernels: list[tuple[str, str]], head_dim: int, work_dir: str, in_child: bool) -> list:
    """Compile (target, dtype) AOT kernels as the plugin does (its PTX version included), write them to
    files and read them back, so what is launched is what a file holds. Returns (kernel, .ptx path)
    pairs. ``in_child``: compile in a fresh process (a dry run's own process interprets Triton, which
    then cannot compile)."""
    from pathlib import Path

    from hybridstitch.plugins.aot import compile_for_target, read_kernel, write_kernel

    if in_child:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        spec = json.dumps({"kernels": kernels, "head_dim": head_dim, "dir": work_dir})
        proc = subprocess.run([sys.executable, "-c", _COMPILE_CHILD, spec], capture_output=True, text=True, env=env,
                              timeout=600)  # fmt: skip
        if proc.returncode != 0:
            raise HybridStitchError(f"compiling the AOT kernels failed:\n{proc.stderr[-3000:]}")
        paths = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("PATHS"))[5:])
    else:
        paths = [write_kernel(compile_for_target(t, dtype=dt, head_dim=head_dim, assemble_cubin=False), work_dir)[1]
                 for t, dt in kernels]  # fmt: skip
    return [(read_kernel(p), str(Path(p).with_suffix(".ptx"))) for p in paths]


class DriverLauncher:
    """The PTX loaded with the CUDA driver's module loader (it JIT-compiles PTX, as it does for the PTX
    a TensorRT engine embeds) and launched with explicit grid, block, shared memory and arguments:
    device pointers as 64-bit values, the extra arguments as int32 -- the plugin kernel's ABI.
    CuPy's RawModule when CuPy is there, else cuda-bindings."""

    def __init__(self, kernel, ptx_path: str):
        self.kernel = kernel
        self._cupy = None
        try:
            import cupy

            # cuModuleLoad on the file: the driver JIT-compiles the PTX
            self._fn = cupy.RawModule(path=ptx_path).get_function(kernel.kernel_name)
            self._cupy, self.api = cupy, f"cupy {cupy.__version__} RawModule (cuModuleLoad)"
            return
        except Exception as error:  # noqa: BLE001 -- no or broken CuPy: the driver API through cuda-bindings
            cupy_problem = error_text(error)
        import ctypes

        import numpy as np

        try:
            from cuda.bindings import driver
        except ImportError as error:
            raise HybridStitchError(f"neither CuPy ({cupy_problem}) nor cuda-bindings ({error}) can load the PTX") from error
        self._driver, self._ctypes = driver, ctypes
        from pathlib import Path

        self._image = np.frombuffer(Path(ptx_path).read_bytes() + b"\0", dtype=np.uint8)  # NUL-terminated PTX text
        err, self._module = driver.cuModuleLoadData(self._image.ctypes.data)
        self._check(err, "cuModuleLoadData")
        err, self._fn = driver.cuModuleGetFunction(self._module, kernel.kernel_name.encode())
        self._check(err, "cuModuleGetFunction")
        self.api = f"cuda-bindings cuModuleLoadData (CuPy: {cupy_problem})"

    def _check(self, err, what: str) -> None:
        if int(err) != 0:
            raise HybridStitchError(f"{what} failed: {err}")

    def __call__(self, launch, args: list) -> None:
        import numpy as np
        import torch

        stream = torch.cuda.current_stream().cuda_stream
        pointers = [isinstance(a, torch.Tensor) for a in args]
        if self._cupy is not None:
            values = tuple(np.uint64(a.data_ptr()) if p else np.int32(a) for a, p in zip(args, pointers))
            with self._cupy.cuda.ExternalStream(stream):
                self._fn(launch.grid, launch.block, values, shared_mem=launch.shared_mem)
            return
        ct = self._ctypes
        values = tuple(a.data_ptr() if p else int(a) for a, p in zip(args, pointers))
        types = tuple(ct.c_void_p if p else ct.c_int32 for p in pointers)
        (err,) = self._driver.cuLaunchKernel(self._fn, *launch.grid, *launch.block, launch.shared_mem,
                                             self._driver.CUstream(stream), (values, types), 0)  # fmt: skip
        self._check(err, "cuLaunchKernel")


class InterpreterLauncher:
    """Dry run: the same argument list, bound by position to the kernel's parameters by Triton's CPU
    interpreter (as the driver binds them to the PTX entry's parameters), same grid."""

    api = "Triton interpreter (dry run)"

    def __init__(self, kernel):
        from hybridstitch.plugins.triton_kernel import get_kernel

        self.kernel, self._fn = kernel, get_kernel()

    def __call__(self, launch, args: list) -> None:
        self._fn[launch.grid](*args, **self.kernel.constexprs())


def part_aot(ctx: Context, report: PartReport) -> None:
    import torch

    from hybridstitch.masks import tokens_for_ratio
    from hybridstitch.plugins.aot import PTX_VERSION, driver_cuda_version, ptx_isa_version, why_ptx_cannot_load
    from hybridstitch.plugins.cached_kv import cached_kv_attention_reference
    from hybridstitch.plugins.tensorrt_plugin import aot_launch, target_for_capability, tensorrt_kernel_arguments
    from hybridstitch.plugins.triton_kernel import interpreter_problem

    work = os.path.join(ctx.args.out, "aot_kernels")
    os.makedirs(work, exist_ok=True)
    if ctx.dry_run:
        if interpreter_problem():
            return report.finish("skipped", interpreter_problem())
        kernels, head_dim = [("sm_80", "fp16"), ("sm_80", "fp32")], 16
        shapes, ratios, iters = [(2, 2, 45, 13)], (0.1, 0.4), 1
        driver = None
    else:
        own = target_for_capability(*torch.cuda.get_device_capability())
        targets = [own] + (["sm_80"] if own != "sm_80" else [])  # sm_80: what ampere_plus engines embed
        kernels, head_dim = [(t, dt) for t in targets for dt in ("fp16", "bf16")], 64
        shapes, ratios, iters = [(2, 38, 2304, TEXT_TOKENS), (2, 38, 4096, TEXT_TOKENS)], BUCKETS, ctx.args.iters
        driver = driver_cuda_version()
    report["driver_cuda"] = f"{driver[0]}.{driver[1]}" if driver else None
    report["ptx_version_wanted"] = f"{PTX_VERSION // 10}.{PTX_VERSION % 10}"
    compiled = compile_aot_kernels(kernels, head_dim, work, in_child=ctx.dry_run)
    failed = False
    for kernel, ptx_path in compiled:
        isa = ptx_isa_version(kernel.ptx)
        load_problem = why_ptx_cannot_load(isa, driver) if driver else None
        report.note(f"{kernel.target} {kernel.dtype}: PTX ISA {isa[0]}.{isa[1]}, {kernel.shared_mem} B shared memory, "
                    f"{kernel.threads_per_block} threads" + (f"; NOT LOADABLE: {load_problem}" if load_problem else ""))
        if load_problem:
            failed = True
            report.add({"target": kernel.target, "dtype": kernel.dtype, "error": load_problem, "passed": False})
            continue
        try:
            launcher = InterpreterLauncher(kernel) if ctx.dry_run else DriverLauncher(kernel, ptx_path)
        except Exception as error:  # noqa: BLE001 -- reported as the row's failure
            failed = True
            report.add({"target": kernel.target, "dtype": kernel.dtype, "error": error_text(error), "passed": False})
            continue
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[kernel.dtype]
        dname = str(dtype).removeprefix("torch.")
        for b, h, n, t in shapes:
            for ratio in ratios:
                if ctx.left() < (1 if ctx.dry_run else 3):
                    return report.finish("partial", "time limit reached; later rows not run")
                k = tokens_for_ratio(ratio, n)
                q, key, v, cache_k, cache_v, index = attention_inputs(b, h, n, t, head_dim, k, dtype, ctx.device, seed=k)
                before = [x.clone() for x in (q, key, v, index)]
                ref_out, ref_k, ref_v = cached_kv_attention_reference(
                    q.float(), key.float(), v.float(), cache_k.float(), cache_v.float(), index)  # fmt: skip
                out = torch.empty_like(q)
                ck, cv = cache_k.clone(), cache_v.clone()
                launch = aot_launch(kernel, b, h, k + t, head_dim, n, k)
                # TensorRT's order; the cache outputs ARE the cache inputs (aliased plugin I/O)
                args = tensorrt_kernel_arguments([q, key, v, ck, cv, index], launch, [out, ck, cv])
                row = {"target": kernel.target, "dtype": kernel.dtype, "N": n, "ratio": ratio, "k": k, "T": t,
                       "grid": list(launch.grid), "block": list(launch.block), "shared_mem": launch.shared_mem,
                       "api": launcher.api}  # fmt: skip
                try:
                    launcher(launch, args)
                    if ctx.cuda:
                        torch.cuda.synchronize()
                    row["max_abs_err"] = (out.float() - ref_out).abs().max().item()
                    row["cache_rows_exact"] = bool(torch.equal(ck.float(), ref_k) and torch.equal(cv.float(), ref_v))
                    row["inputs_untouched"] = all(torch.equal(a, b_) for a, b_ in zip(before, (q, key, v, index)))
                    row["passed"] = row["max_abs_err"] <= TOLERANCE[dname] and row["cache_rows_exact"] and row["inputs_untouched"]
                    row["ms"] = 1e3 * statistics.median(time_call(lambda: launcher(launch, args), iters, 1, ctx.cuda))
                except Exception as error:  # noqa: BLE001 -- a bad launch is this row's result
                    row.update(error=error_text(error), passed=False)
                failed |= not row["passed"]
                report.add(row)
    report.finish("failed" if failed else "passed", "a launch failed or disagreed with the reference" if failed else None)


def render_aot(data: dict) -> list[str]:
    lines = [
        f"PTX ISA asked for: {data.get('ptx_version_wanted')}; driver CUDA version: {data.get('driver_cuda') or 'n/a'}. "
        "Launched with the plugin's own launch computation (aot_launch) and TensorRT's argument order "
        "(tensorrt_kernel_arguments), cache outputs aliased to the cache inputs. Parity against the fp32 reference; "
        "cache rows must be exact and query/key/value/index untouched.",
        "",
        "| target | dtype | N | r | k | grid | block | shared mem | ms | max abs err | cache rows | inputs | pass |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        if "N" not in row:
            lines.append(f"| {row['target']} | {row['dtype']} | | | | | | | ERROR: {row['error'][:200]} | | | | NO |")
            continue
        head = (f"| {row['target']} | {row['dtype']} | {row['N']} | {row['ratio']:.1f} | {row['k']} | "
                f"{'x'.join(map(str, row['grid']))} | {'x'.join(map(str, row['block']))} | {row['shared_mem']} |")
        if "error" in row:
            lines.append(f"{head} ERROR: {row['error'][:200]} | | | | NO |")
            continue
        lines.append(f"{head} {row['ms']:.3f} | {row['max_abs_err']:.2e} | {'exact' if row['cache_rows_exact'] else 'DIFFER'} | "
                     f"{'untouched' if row['inputs_untouched'] else 'WRITTEN'} | {'yes' if row['passed'] else 'NO'} |")
    if data["rows"] and "api" in data["rows"][-1]:
        lines += ["", f"Launched through: {data['rows'][-1]['api']}."]
    return lines


# -- models (masked, e2e, memory, batching) --------------------------------------------------------------------


@contextmanager
def default_dtype(dtype):
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_transformer(cfg: dict, device, dtype, seed: int):
    """A random-weight SD3 transformer made directly on ``device`` in ``dtype`` (no fp32 copy first)."""
    import torch
    from diffusers import SD3Transformer2DModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        model = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, out_channels=16, **cfg)
    return model.to(device=device, dtype=dtype).eval()


def denoisers(ctx: Context, dtype):
    """(large, small) behind the torch backend's denoiser interface: SD3.5 Large and SD3 Medium shapes,
    or the tiny stand-ins of a dry run. The one place the suite touches hybridstitch.engine."""
    from hybridstitch.engine.torch_backend import TorchDenoiser

    large_cfg, small_cfg = (TINY_LARGE, TINY_SMALL) if ctx.dry_run else (SD35_LARGE, SD3_MEDIUM)
    large = TorchDenoiser(build_transformer(large_cfg, ctx.device, dtype, ctx.args.seed), "large")
    small = TorchDenoiser(build_transformer(small_cfg, ctx.device, dtype, ctx.args.seed + 1), "small")
    return large, small


def step_inputs(large, batch: int, height: int, width: int, text_tokens: int, device, dtype, seed: int):
    """latents [batch, 16, h, w], prompt embeds [batch, T, 4096], pooled [batch, 2048], timesteps [batch]."""
    import torch

    g = torch.Generator().manual_seed(seed)
    h, w = height // 8, width // 8
    x = torch.randn(batch, 16, h, w, generator=g).to(device, dtype)
    pe = torch.randn(batch, text_tokens, large.spec.joint_attention_dim, generator=g).to(device, dtype)
    pooled = torch.randn(batch, large.spec.pooled_projection_dim, generator=g).to(device, dtype)
    ts = torch.full((batch,), 500.0, device=device)
    return x, pe, pooled, ts, h, w


def graphed(fn, before_capture=None):
    """``fn`` captured into a CUDA graph (after warm-up on a side stream, as torch.cuda.graph wants);
    returns the replay function and the graph (keep it alive while replaying). ``before_capture()``
    runs just before the capture, to hold on to what the captured call reads."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    if before_capture is not None:
        before_capture()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay, graph


# -- part: masked ------------------------------------------------------------------------------------------


def part_masked(ctx: Context, report: PartReport) -> None:
    import torch

    from hybridstitch.bench import flop_ratios
    from hybridstitch.masks import tokens_for_ratio

    if ctx.dry_run:
        dtypes, sizes, modes, iters, warmup = [torch.float32, torch.bfloat16], [64, 128], ["eager"], 2, 1
        layers, widths, text = (TINY_LARGE["num_layers"], TINY_SMALL["num_layers"]), (32, 16), 8
        report.note("CUDA graphs: not on the CPU (dry run)")
    else:
        dtypes, sizes, modes, iters, warmup = [torch.float16, torch.bfloat16], [768, 1024], ["eager", "cuda graph"], 5, 2
        layers, widths, text = (38, 24), (2432, 1536), TEXT_TOKENS
    t0 = time.time()
    large, small = denoisers(ctx, dtypes[0])
    report["build_seconds"] = round(time.time() - t0, 1)
    report["params"] = {n: sum(p.numel() for p in d.model.parameters()) for n, d in (("large", large), ("small", small))}
    # seconds per round of calls (full, four masked, small), per size: measured, or a first guess
    # (768^2 fp16 on an H200: ~0.2 s full + ~0.25 s masked + 0.05 s small)
    round_cost = {size: (0.05 if ctx.dry_run else 1.0 * (size / 768) ** 2) for size in sizes}
    failed = False
    for dtype in dtypes:
        if large.dtype != dtype:
            large.model.to(dtype)
            small.model.to(dtype)
        dname = str(dtype).removeprefix("torch.")
        for size in sizes:
            x, pe, pooled, ts, h, w = step_inputs(large, 2, size, size, text, ctx.device, dtype, ctx.args.seed)
            n = (h // 2) * (w // 2)
            flops = flop_ratios(image_tokens=n, text_tokens=text, layers=layers, widths=widths, buckets=BUCKETS)
            g = torch.Generator().manual_seed(size)
            indices = {}
            for r in BUCKETS:  # one mask serves both CFG halves, as in the method
                k = tokens_for_ratio(r, n)
                indices[r] = torch.sort(torch.randperm(n, generator=g)[:k]).values.to(ctx.device)[None].expand(2, -1).contiguous()
            for mode in modes:
                rounds = iters + warmup + 1 + (3 if mode == "cuda graph" else 0)  # + cache fill; + capture and its warm-up
                need = round_cost[size] * rounds
                if ctx.left() < need:
                    report.note(f"{dname} {size}x{size} {mode}: not run (time limit; needs ~{need:.0f} s)")
                    return report.finish("partial", "time limit reached; later configurations not run")
                calls = {"full": lambda: large.forward_store(x, pe, pooled, ts)}
                _, caches = calls["full"]()  # the caches the masked calls read (the caller owns them)
                for r, index in indices.items():
                    calls[f"masked {r:g}"] = (lambda index=index: large.forward_masked(x, pe, pooled, ts, index, caches))
                calls["small"] = lambda: small.forward(x, pe, pooled, ts)
                row = {"dtype": dname, "size": size, "mode": mode, "N": n, "T": text, "calls": {}}
                t_round = time.time()
                # the graphs, and the cache tensors each captured call reads: a masked call replaces the
                # cache's tensors, and a graph must not read memory the allocator has handed on
                keep = []
                try:
                    for name, fn in calls.items():
                        if mode == "cuda graph":
                            fn, graph = graphed(fn, before_capture=lambda: keep.append(dict(caches)))
                            keep.append(graph)
                        row["calls"][name] = stats(time_call(fn, iters, warmup, ctx.cuda))
                except Exception as error:  # noqa: BLE001 -- e.g. a capture that fails: this configuration's result
                    row["error"] = error_text(error)
                    failed = True
                round_cost[size] = (time.time() - t_round) / rounds
                del keep
                if "error" not in row:
                    t_l, t_s = row["calls"]["full"]["median"], row["calls"]["small"]["median"]
                    row["t_s_over_t_l"] = t_s / t_l
                    row["buckets"] = []
                    for r in BUCKETS:
                        k = tokens_for_ratio(r, n)
                        t_r = row["calls"][f"masked {r:g}"]["median"]
                        ideal = (k + text) / (n + text)
                        row["buckets"].append({"ratio": r, "k": k, "t_l_r_over_t_l": t_r / t_l, "ideal": ideal,
                                               "flop_ratio": flops["t_l_r_over_t_l"][r], "efficiency": ideal / (t_r / t_l),
                                               "bound_holds": t_r + t_s < t_l})  # fmt: skip
                report.add(row)
                if ctx.cuda:
                    torch.cuda.empty_cache()
    report.finish("failed" if failed else "passed", "a configuration failed (see the rows)" if failed else None)


def render_masked(data: dict) -> list[str]:
    lines = [
        "Per call, median ms (CUDA events on a GPU). t_l: the full large forward storing the KV cache; t_l(r): the masked "
        "forward at mask ratio r (k = ceil(rN) image tokens + T text tokens attend over the cache); ideal = (k+T)/(N+T), "
        "the share of tokens computed; FLOP ratio counts the attention over all N+T keys too; efficiency = ideal / "
        "measured ratio; bound: t_l(r) + t_s < t_l with t_s the SD3 Medium forward. The torch path's op is functional: "
        "a masked call also copies every layer's K/V cache once (~6 GB of traffic at 1024^2, ~1.5 ms on an H200), which "
        "the TensorRT plugin, updating in place, does not.",
        "",
        f"Models built in {data.get('build_seconds', '?')} s; parameters: "
        + ", ".join(f"{k} {v / 1e9:.2f} B" for k, v in data.get("params", {}).items()) + ".",
        "",
        "| dtype | size | mode | r | k | t_l ms | t_l(r) ms | t_l(r)/t_l | ideal (k+T)/(N+T) | FLOP ratio | efficiency | t_s/t_l | bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        head = f"| {row['dtype']} | {row['size']}x{row['size']} | {row['mode']} |"
        if "error" in row:
            lines.append(f"{head} | | ERROR: {row['error'][:200]} | | | | | | | |")
            continue
        t_l = row["calls"]["full"]["median"] * 1e3
        for bucket in row["buckets"]:
            t_r = row["calls"][f"masked {bucket['ratio']:g}"]["median"] * 1e3
            lines.append(
                f"{head} {bucket['ratio']:.1f} | {bucket['k']} | {t_l:.1f} | {t_r:.1f} | {bucket['t_l_r_over_t_l']:.3f} | "
                f"{bucket['ideal']:.3f} | {bucket['flop_ratio']:.3f} | {bucket['efficiency']:.2f} | {row['t_s_over_t_l']:.3f} | "
                f"{'yes' if bucket['bound_holds'] else '**no**'} |"
            )
    return lines


# -- part: e2e ---------------------------------------------------------------------------------------------

E2E_METHODS = ("large", "small", "t-stitch", "srdiffusion", "hybridstitch-10", "hybridstitch-20", "hybridstitch-30",
               "hybridstitch-40")


def part_e2e(ctx: Context, report: PartReport) -> None:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    from hybridstitch.bench import ReplaySwitches, replay_denoise, replay_stages
    from hybridstitch.conditioning import Conditioning
    from hybridstitch.config import StitchConfig
    from hybridstitch.latency_model import (
        CallLatencies,
        break_even_ratio,
        mask_ratio_bound,
        predict_from_counts,
        predict_from_trace,
        ratio_key,
    )
    from hybridstitch.masks import tokens_for_ratio

    a = ctx.args
    if ctx.dry_run:
        dtype, steps, size, text, iters, warmup = torch.float32, 8, 128, 8, 2, 1
        switches = ReplaySwitches(stitch=(2, 6), tstitch=3, srdiffusion=4)
    else:
        dtype, steps, size, text, iters, warmup = torch.float16, a.steps, 768, TEXT_TOKENS, 10, 3
        switches = ReplaySwitches(stitch=(round(0.3 * steps), round(0.7 * steps)), tstitch=round(0.4 * steps),
                                  srdiffusion=round(0.5 * steps))  # fmt: skip
    report["setup"] = {"dtype": str(dtype).removeprefix("torch."), "steps": steps, "size": size, "text_tokens": text,
                       "cfg_batch": 2, "guidance_scale": 4.5, "switches": {"hybridstitch": list(switches.stitch),
                       "t-stitch": switches.tstitch, "srdiffusion": switches.srdiffusion}}  # fmt: skip
    t0 = time.time()
    large, small = denoisers(ctx, dtype)
    report["build_seconds"] = round(time.time() - t0, 1)
    x, pe, pooled, ts, h, w = step_inputs(large, 2, size, size, text, ctx.device, dtype, a.seed)
    cond = Conditioning(pe, pooled)  # [uncond, cond]: CFG batch 2
    latents = x[:1]
    n_tok = (h // 2) * (w // 2)

    # 1. per-call latencies (what the latency model is fed)
    _, caches = large.forward_store(x, pe, pooled, ts)
    calls = {"large": stats(time_call(lambda: large.forward(x, pe, pooled, ts), iters, warmup, ctx.cuda)),
             "large+kv": stats(time_call(lambda: large.forward_store(x, pe, pooled, ts), iters, warmup, ctx.cuda)),
             "small": stats(time_call(lambda: small.forward(x, pe, pooled, ts), iters, warmup, ctx.cuda))}  # fmt: skip
    g = torch.Generator().manual_seed(a.seed)
    masked = {}
    for r in BUCKETS:
        k = tokens_for_ratio(r, n_tok)
        index = torch.sort(torch.randperm(n_tok, generator=g)[:k]).values.to(ctx.device)[None].expand(2, -1).contiguous()
        masked[r] = stats(time_call(lambda: large.forward_masked(x, pe, pooled, ts, index, caches), iters, warmup, ctx.cuda))
        masked[r]["tokens"] = k
    lat = CallLatencies(calls["large"]["median"], calls["small"]["median"], {r: m["median"] for r, m in masked.items()})
    report["per_call"] = {**calls, "large_masked": {str(r): m for r, m in masked.items()}}
    report["t_s_over_t_l"] = lat.small / lat.large
    report["break_even_ratio"] = break_even_ratio(lat.large, lat.small)
    report["bound"] = [{"ratio": r, "t_l_r_over_t_l": t / lat.large, "holds": mask_ratio_bound(lat.large, lat.small, t)}
                       for r, t in sorted(lat.masked.items())]  # fmt: skip
    report.save()

    # 2. end to end: the pipeline's loop with replayed stages, repetitions cut to the time left
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    configs = [StitchConfig.preset(m) for m in E2E_METHODS]
    schedules = {c.name: replay_stages(c, steps, switches) for c in configs}
    estimate = {}
    for c in configs:
        st = schedules[c.name]
        counts: dict[float, int] = {}
        for s in st:
            if s.kind == "masked":
                counts[ratio_key(s.mask_ratio)] = counts.get(ratio_key(s.mask_ratio), 0) + 1
        pred = predict_from_counts(sum(s.kind == "large" for s in st), counts, sum(s.kind == "small" for s in st), lat,
                                   masked_runs_full_large=c.stage2_large == "full")  # fmt: skip
        estimate[c.name] = pred.total_seconds * 1.1  # + the loop's own overhead
    warm_steps = min(5, steps)
    warm_cost = sum(warm_steps / steps * e for e in estimate.values())
    left = ctx.left() - warm_cost - (2 if ctx.dry_run else 10)
    per_rep = sum(estimate.values())
    reps = max(0, min(a.reps, int(left // per_rep))) if per_rep > 0 else a.reps
    keep = list(configs)
    if reps == 0:  # not one repetition of everything: keep methods in order while they fit
        reps, keep, acc = 1, [], 0.0
        for c in configs:
            if acc + estimate[c.name] <= left:
                keep.append(c)
                acc += estimate[c.name]
    report["reps"], report["dropped_methods"] = reps, [c.name for c in configs if c not in keep]
    report["estimate_seconds"] = estimate
    report.save()

    def run(c, stages):
        return replay_denoise(large, small, scheduler, latents, cond, c, stages, 4.5)[1][0]

    warm = ReplaySwitches(stitch=(2, 4), tstitch=2, srdiffusion=2)
    for c in keep:  # warm the loop itself (the calls are warm already)
        run(c, replay_stages(c, warm_steps, warm))
    traces: dict[str, list] = {c.name: [] for c in keep}
    for _ in range(reps):
        for c in keep:
            traces[c.name].append(run(c, schedules[c.name]))
    base = statistics.median(t.total_seconds for t in traces["large"]) if traces.get("large") else None
    for c in keep:
        secs = [t.total_seconds for t in traces[c.name]]
        med = statistics.median(secs)
        tr = traces[c.name][0]
        pred = predict_from_trace(tr, lat)
        model_s = statistics.median(t.model_seconds for t in traces[c.name])
        report["rows"].append({
            "method": c.name, "seconds": stats(secs), "speedup": base / med if base else None,
            "switch_steps": tr.switch_steps, "stage_counts": tr.stage_counts, "overhead_share": (med - model_s) / med,
            "model": pred.to_dict(), "measured_over_model": med / pred.total_seconds,
        })  # fmt: skip
    if ctx.cuda:
        report["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if report["dropped_methods"]:
        return report.finish("partial", f"time limit: dropped {', '.join(report['dropped_methods'])}")
    report.finish("passed")


def render_e2e(data: dict) -> list[str]:
    if "per_call" not in data:
        return ["No measurement finished."]
    s = data["setup"]
    pc = data["per_call"]
    t_l = pc["large"]["median"]
    ms = lambda st: f"{st['median'] * 1e3:.1f} ({st['min'] * 1e3:.1f}-{st['max'] * 1e3:.1f})"  # noqa: E731
    lines = [
        f"{s['dtype']} random weights, {s['size']}x{s['size']}, {s['text_tokens']} text tokens, CFG batch 2, {s['steps']} steps, "
        f"torch eager; models built in {data.get('build_seconds', '?')} s.",
        "",
        f"### Per-call latency, ms (median (min-max) of {pc['large']['n']})",
        "",
        "| call | ms | / t_l | t_l(r) + t_s < t_l |",
        "|---|---|---|---|",
        f"| large (t_l) | {ms(pc['large'])} | 1.000 | |",
        f"| large + KV-cache store | {ms(pc['large+kv'])} | {pc['large+kv']['median'] / t_l:.3f} | |",
        f"| small (t_s) | {ms(pc['small'])} | {pc['small']['median'] / t_l:.3f} | |",
    ]
    for b in data["bound"]:
        st = pc["large_masked"][str(b["ratio"])]
        lines.append(f"| masked large r={b['ratio']:g} ({st['tokens']} tokens) | {ms(st)} | {b['t_l_r_over_t_l']:.3f} | "
                     f"{'yes' if b['holds'] else '**no**'} |")
    lines += [
        "",
        f"t_s / t_l = {data['t_s_over_t_l']:.3f}; break-even ratio 1 - t_s/t_l = {data['break_even_ratio']:.2f}.",
        "",
        f"### End to end ({data.get('reps', 0)} repetition(s), interleaved; replayed switch steps {s['switches']})",
        "",
        "| method | switch steps | stages L/M/S | s median (min-max) | speed-up | model s | measured / model | model speed-up | overhead |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in data["rows"]:
        sc, st = e["stage_counts"], e["seconds"]
        lines.append(
            f"| {e['method']} | {', '.join(map(str, e['switch_steps'])) or '-'} | "
            f"{sc.get('large', 0)}/{sc.get('masked', 0)}/{sc.get('small', 0)} | "
            f"{st['median']:.3g} ({st['min']:.3g}-{st['max']:.3g}) | " + (f"{e['speedup']:.2f}x" if e["speedup"] else "n/a")
            + f" | {e['model']['total_seconds']:.3g} | {e['measured_over_model']:.3f} | {e['model']['speedup']:.2f}x | "
            f"{e['overhead_share']:.1%} |"
        )
    if data.get("dropped_methods"):
        lines += ["", f"Dropped to fit the time limit: {', '.join(data['dropped_methods'])}."]
    if "max_memory_gib" in data:
        lines += ["", f"Peak GPU memory {data['max_memory_gib']:.1f} GiB."]
    return lines


# -- part: memory (hook) -------------------------------------------------------------------------------------

NO_MEMORY_PLAN = "no memory plan in this version (hybridstitch.export offers no memory_plan)"


def part_memory(ctx: Context, report: PartReport, export_module=None) -> None:
    """HOOK for the export's memory plan. Runs once ``hybridstitch.export.memory_plan`` exists, called as

        memory_plan(large_config: dict, small_config: dict, *, height, width, batch, text_tokens,
                    precision, buckets) -> dict[str, int]      # item -> bytes on the device

    with the item names ``weights_large``, ``weights_small``, ``kv_cache`` (one request's cache,
    all layers) and ``activations`` (the largest single forward's working memory); other items
    are listed as planned only. Until then the part is skipped with :data:`NO_MEMORY_PLAN`.
    """
    import torch

    if export_module is None:
        import hybridstitch.export as export_module
    plan_fn = getattr(export_module, "memory_plan", None)
    if plan_fn is None:
        return report.finish("skipped", NO_MEMORY_PLAN)
    dtype = torch.float32 if ctx.dry_run else torch.float16
    size, text = (128, 8) if ctx.dry_run else (1024, TEXT_TOKENS)
    large_cfg, small_cfg = (TINY_LARGE, TINY_SMALL) if ctx.dry_run else (SD35_LARGE, SD3_MEDIUM)
    plan = plan_fn(large_cfg, small_cfg, height=size, width=size, batch=2, text_tokens=text,
                   precision="fp32" if ctx.dry_run else "fp16", buckets=BUCKETS)  # fmt: skip
    large, small = denoisers(ctx, dtype)

    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    measured = {"weights_large": nbytes(large.model.parameters()), "weights_small": nbytes(small.model.parameters())}
    x, pe, pooled, ts, h, w = step_inputs(large, 2, size, size, text, ctx.device, dtype, ctx.args.seed)
    if ctx.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    _, caches = large.forward_store(x, pe, pooled, ts)
    measured["kv_cache"] = nbytes(caches.values())
    if ctx.cuda:
        measured["activations"] = torch.cuda.max_memory_allocated() - before - measured["kv_cache"]
    for item in sorted(set(plan) | set(measured)):
        p, m = plan.get(item), measured.get(item)
        report.add({"item": item, "planned_bytes": p, "measured_bytes": m, "measured_over_planned": m / p if p and m else None})
    report.finish("passed")


def render_memory(data: dict) -> list[str]:
    lines = ["| item | planned GiB | measured GiB (torch path) | measured / planned |", "|---|---|---|---|"]
    gib = lambda v: f"{v / 2**30:.2f}" if v is not None else "n/a"  # noqa: E731
    for row in data["rows"]:
        ratio = row["measured_over_planned"]
        lines.append(f"| {row['item']} | {gib(row['planned_bytes'])} | {gib(row['measured_bytes'])} | "
                     f"{f'{ratio:.2f}' if ratio is not None else 'n/a'} |")
    return lines


# -- part: batching (hook) -----------------------------------------------------------------------------------

NO_SCHEDULER = "no step-level scheduler in this version (hybridstitch.scheduler offers no run_requests)"
BATCH_SIZES = (1, 2, 4, 8)


def part_batching(ctx: Context, report: PartReport, scheduler_module=None) -> None:
    """HOOK for step-level batching. Runs once ``hybridstitch.scheduler.run_requests`` exists, called as

        run_requests(large, small, flow_scheduler, requests: list[dict], guidance_scale: float) -> list

    where each request is ``dict(latents=[1, 16, h, w], cond=Conditioning (CFG-batched), config=StitchConfig,
    num_inference_steps=int)`` and all of them are in flight together (the scheduler groups them per
    engine each step). Reports requests per second at 1, 2, 4 and 8 requests and the gain over one
    at a time. Until then the part is skipped with :data:`NO_SCHEDULER`.
    """
    import importlib

    import torch

    if scheduler_module is None:
        try:
            scheduler_module = importlib.import_module("hybridstitch.scheduler")
        except ImportError:
            scheduler_module = None
    run_requests = getattr(scheduler_module, "run_requests", None)
    if run_requests is None:
        return report.finish("skipped", NO_SCHEDULER)
    from diffusers import FlowMatchEulerDiscreteScheduler

    from hybridstitch.conditioning import Conditioning
    from hybridstitch.config import StitchConfig

    dtype = torch.float32 if ctx.dry_run else torch.float16
    size, text, steps = (128, 8, 4) if ctx.dry_run else (768, TEXT_TOKENS, 20)
    large, small = denoisers(ctx, dtype)
    flow = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    config = StitchConfig.preset("hybridstitch-30")
    single = None
    for count in BATCH_SIZES:
        if ctx.left() < 5:
            return report.finish("partial", "time limit reached; larger batches not run")
        requests = []
        for i in range(count):
            x, pe, pooled, _, _, _ = step_inputs(large, 2, size, size, text, ctx.device, dtype, ctx.args.seed + i)
            requests.append(dict(latents=x[:1], cond=Conditioning(pe, pooled), config=config, num_inference_steps=steps))
        secs = time_call(lambda: run_requests(large, small, flow, requests, 4.5), 1, 0, ctx.cuda)[0]
        throughput = count / secs
        single = single or throughput
        report.add({"requests": count, "seconds": secs, "requests_per_s": throughput, "gain_over_one": throughput / single})
    report.finish("passed")


def render_batching(data: dict) -> list[str]:
    lines = ["| requests in flight | seconds | requests/s | gain over one |", "|---|---|---|---|"]
    for row in data["rows"]:
        lines.append(f"| {row['requests']} | {row['seconds']:.2f} | {row['requests_per_s']:.3f} | {row['gain_over_one']:.2f}x |")
    return lines


RUN = {"kernel": part_kernel, "aot": part_aot, "masked": part_masked, "e2e": part_e2e, "memory": part_memory,
       "batching": part_batching}
RENDER = {"kernel": render_kernel, "aot": render_aot, "masked": render_masked, "e2e": render_e2e, "memory": render_memory,
          "batching": render_batching}


def render_part(data: dict) -> str:
    env = data.get("env") or {}
    lines = [
        f"# {data['part']}: {data['title']}{' (DRY RUN: CPU, tiny sizes; the numbers mean nothing)' if data['dry_run'] else ''}",
        "",
        f"**Status: {data['status']}**" + (f" -- {data['reason']}" if data.get("reason") else "")
        + f" ({data['seconds']:.0f} s of a {data['limit_s']:.0f} s limit)",
        "",
        f"{data['started']} · {env.get('device', '?')}" + "".join(
            f" · {k} {env[k]}" for k in ("torch", "cuda", "triton", "driver_cuda") if env.get(k)),
        "",
    ]
    if data["rows"] or data["part"] == "e2e":
        try:
            lines += RENDER[data["part"]](data)
        except Exception as error:  # noqa: BLE001 -- a partial report must still render its header
            lines.append(f"(table unavailable: {error_text(error)})")
    if data.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in data["notes"]]
    if data.get("error"):
        lines += ["", "```", data["error"], "```"]
    return "\n".join(lines) + "\n"


# -- the worker: one part in this process ----------------------------------------------------------------------


def run_worker(args) -> int:
    report = PartReport(args.worker, args.out, args.dry_run, args.limit_s)
    ctx = Context(args, deadline=args.deadline)
    try:
        import torch

        if args.dry_run:
            torch.set_num_threads(1)
        report["env"] = environment(ctx.cuda)
        report.save()
        RUN[args.worker](ctx, report)
    except Exception as error:  # noqa: BLE001 -- the part's result, with the traceback, is the report
        report["error"] = traceback.format_exc()[-4000:]
        report.finish("error", error_text(error))
    if report["status"] == "running":
        report.finish("passed")
    return 0


# -- the orchestrator --------------------------------------------------------------------------------------------


def part_limits(parts: list[str], budget: float) -> dict:
    """Seconds per part: the budget split by the parts' shares."""
    total = sum(PARTS[p][0] for p in parts)
    return {p: budget * PARTS[p][0] / total for p in parts}


def headline(data: dict) -> str:
    """One line per part for the summary."""
    rows = data.get("rows") or []
    try:
        if data["part"] == "kernel" and rows:
            best = max(rows, key=lambda r: r["ratio"])
            v = min((v for v in best["variants"] if "ms" in v), key=lambda v: v["ms"])
            return (f"{len(rows)} rows; best at r={best['ratio']:.1f}, N={best['N']}, {best['dtype']}: {v['label']} "
                    f"{best['baseline_ms'] / v['ms']:.2f}x the SDPA baseline")
        if data["part"] == "aot" and rows:
            ok = sum(bool(r.get("passed")) for r in rows)
            return (f"{ok}/{len(rows)} launches ({rows[-1].get('api', '?')}) match the reference; "
                    f"PTX ISA {data.get('ptx_version_wanted')}")
        if data["part"] == "masked" and rows:
            good = [r for r in rows if "buckets" in r]
            if good:
                r = good[-1]
                b = next(x for x in r["buckets"] if x["ratio"] == 0.3)
                return (f"{r['dtype']} {r['size']}^2 {r['mode']}: t_l(0.3)/t_l {b['t_l_r_over_t_l']:.3f} vs ideal "
                        f"{b['ideal']:.3f}; bound {'holds' if b['bound_holds'] else 'FAILS'} at 0.3")
        if data["part"] == "e2e" and rows:
            hs = {r["method"]: r["speedup"] for r in rows if r["speedup"]}
            return ", ".join(f"{m} {s:.2f}x" for m, s in hs.items() if m != "large")
    except Exception as error:  # noqa: BLE001 -- a summary line must never break the summary
        return f"(no headline: {error_text(error)})"
    return data.get("reason") or ""


def write_summary(out: str, results: list[dict], args, total_s: float) -> None:
    lines = [
        f"# GPU suite{' (DRY RUN)' if args.dry_run else ''}: {results[0].get('env', {}).get('device', '?') if results else '?'}",
        "",
        f"{utc_now()} · budget {args.budget_s:.0f} s · total {total_s:.0f} s",
        "",
        "| part | status | seconds | limit | result | files |",
        "|---|---|---|---|---|---|",
    ]
    for d in results:
        lines.append(f"| {d['part']} | {d['status']} | {d['seconds']:.0f} | {d['limit_s']:.0f} | "
                     f"{headline(d).replace('|', '/')} | {d['part']}.json, {d['part']}.md |")
    atomic_write_text(os.path.join(out, "summary.md"), "\n".join(lines) + "\n")
    summary = {"dry_run": args.dry_run, "budget_s": args.budget_s, "total_s": total_s, "date": utc_now(),
               "parts": {d["part"]: {"status": d["status"], "reason": d.get("reason"), "seconds": d["seconds"],
                                     "limit_s": d["limit_s"]} for d in results}}  # fmt: skip
    atomic_write_text(os.path.join(out, "summary.json"), json.dumps(summary, indent=2) + "\n")


def run_part(name: str, args, limit: float) -> dict:
    """Run one part in a fresh process; stop it ``grace`` seconds after its limit. Returns its report."""
    deadline = time.time() + limit
    grace = args.grace_s if args.grace_s is not None else min(20.0, max(2.0, 0.1 * limit))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--out", args.out, "--deadline", repr(deadline),
           "--limit-s", repr(limit), "--seed", str(args.seed), "--iters", str(args.iters), "--steps", str(args.steps),
           "--reps", str(args.reps)] + (["--dry-run"] if args.dry_run else [])  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.dry_run and name in ("kernel", "aot"):
        env["TRITON_INTERPRET"] = "1"  # read when Triton is imported: the worker's own process
    log_path = os.path.join(args.out, f"{name}.log")
    t0 = time.time()
    with open(log_path, "w") as log:
        # a process group of its own, so a stop reaches the children it started too (compiler
        # processes, the dry run's compile step)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            proc.wait(timeout=limit + grace)
            killed = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            killed = True
        except BaseException:  # the suite itself is stopped (Ctrl-C, `timeout`): stop the part with it
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    path = os.path.join(args.out, f"{name}.json")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = {"part": name, "title": PARTS[name][1], "status": "error", "reason": None, "dry_run": args.dry_run,
                "started": utc_now(), "env": {}, "rows": [], "notes": []}  # fmt: skip
    data["seconds"], data["limit_s"] = round(time.time() - t0, 1), round(limit, 1)
    if killed:
        data["status"], data["reason"] = "timed out", f"stopped {grace:.0f} s after its {limit:.0f} s limit; rows so far kept"
    elif data["status"] == "running" or proc.returncode != 0:
        with open(log_path, errors="replace") as f:
            tail = f.read()[-3000:]
        data["status"] = "error"
        data["reason"] = f"the part's process ended with status {proc.returncode} before finishing (see {name}.log)"
        data["error"] = tail
    write_part(args.out, data)
    return data


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the results (created; never defaults into the repository)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list, in this order: {','.join(PARTS)}")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help="seconds for all parts together, split by the parts' shares (later parts get what earlier ones leave)")
    p.add_argument("--grace-s", type=float, default=None, help="seconds a part gets past its limit before it is stopped")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the wiring in seconds")
    p.add_argument("--iters", type=int, default=20, help="timed calls per kernel measurement")
    p.add_argument("--steps", type=int, default=50, help="denoising steps of the end-to-end runs")
    p.add_argument("--reps", type=int, default=2, help="end-to-end repetitions, cut to the time limit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", choices=list(PARTS), help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    p.add_argument("--limit-s", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.out = os.path.abspath(args.out)
    if args.worker is None:
        args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
        unknown = [x for x in args.parts if x not in PARTS]
        if unknown or not args.parts:
            p.error(f"unknown part(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(PARTS)}")
        args.parts = [x for x in PARTS if x in args.parts]
        if args.budget_s <= 0:
            p.error("--budget-s must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.worker:
        return run_worker(args)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("gpu_suite: no CUDA GPU visible to torch; run it on a GPU machine, or pass --dry-run to check the "
                  "wiring on the CPU", file=sys.stderr)  # fmt: skip
            return 2
    t0 = time.time()
    results = []

    def stop(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    # a SIGTERM (``timeout``, a job runner) stops the running part too and still writes the summary;
    # a part left running would hold the GPU after the suite is gone
    signal.signal(signal.SIGTERM, stop)
    try:
        for i, name in enumerate(args.parts):
            # the budget still left, split over the parts still to run: time a part leaves goes to the next
            left = args.budget_s - (time.time() - t0)
            limit = max(1.0, part_limits(args.parts[i:], max(left, 1.0))[name])
            print(f"gpu_suite: {name} ({PARTS[name][1]}), limit {limit:.0f} s", flush=True)
            data = run_part(name, args, limit)
            print(f"gpu_suite: {name}: {data['status']}" + (f" -- {data['reason']}" if data.get("reason") else "")
                  + f" ({data['seconds']:.0f} s)", flush=True)  # fmt: skip
            results.append(data)
    except KeyboardInterrupt as why:
        print(f"gpu_suite: stopped ({why or 'interrupted'}); the summary lists the parts that finished", file=sys.stderr)
        write_summary(args.out, results, args, time.time() - t0)
        return 1
    total = time.time() - t0
    write_summary(args.out, results, args, total)
    with open(os.path.join(args.out, "summary.md")) as f:
        print(f.read())
    return 0 if all(d["status"] in STATUS_OK for d in results) else 1


if __name__ == "__main__":
    sys.exit(main())
