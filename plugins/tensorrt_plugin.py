"""TensorRT plugin ``hybridstitch::CachedKVAttention``: a Python ``tensorrt.plugin`` (TensorRT >= 10.9)
with an ahead-of-time Triton implementation, so built engines run without Python.

How the pieces meet:

- The ONNX graph holds one ``CachedKVAttention`` node of domain ``hybridstitch`` per attention
  slot (``plugins/onnx_op.py``). ``plugins/onnx_for_tensorrt.py`` strips its local function and
  adds ``plugin_namespace="hybridstitch"`` and ``aot=1``; TensorRT's ONNX parser then finds this
  plugin's creator by op type (name ``CachedKVAttention``), namespace and version ``"1"`` (the
  only version ``tensorrt.plugin`` registers; it equals ``OP_VERSION``) and asks it for the AOT
  implementation.
- :func:`register_plugin` registers the descriptor, the type/format combinations and the AOT
  implementation. The AOT implementation returns the PTX from :mod:`.aot` (compiled for the
  build GPU's target, or the one named), its launch grid as symbolic expressions of the input
  shapes, and the kernel's int32 arguments (strides and sizes) as symbolic expressions too.
  TensorRT embeds the PTX in the engine and launches it with (input pointers, those int32
  arguments, output pointers) -- the kernel's parameter order. :func:`aot_launch` computes the
  grid, block, shared memory and int32 arguments, for ``aot_impl`` on TensorRT's shape
  expressions and for ``benchmarks/gpu_suite.py`` on plain ints (it launches the same PTX
  through the CUDA driver in that order, :func:`tensorrt_kernel_arguments`, to check the ABI
  without TensorRT).

Versions: TensorRT 10.9 added AOT implementations to ``tensorrt.plugin`` (10.8 has JIT only);
11.0 keeps every API used here (its strongly-typed network flag is deprecated because every
network is strongly typed, which is what the build asks for anyway). Torch-TensorRT 2.13,
the first that handles this op's three outputs, depends on TensorRT 11.0 (2.14 on 11.1), so
pinning below 11 would rule that path out.
:func:`why_tensorrt_unsupported` states the supported range.

The cache is ALIASED IN PLACE, not returned as a fresh tensor: outputs 1 and 2 are
``cache_k.aliased()`` / ``cache_v.aliased()``, so TensorRT hands the kernel the input cache
buffers as the cache outputs and the kernel writes the k fresh rows into them (no copy of the
whole [B, H, N, D] cache per layer). This needs TensorRT's preview feature
``ALIASED_PLUGIN_IO_10_03`` on the builder config (:func:`enable_aliased_plugin_io`); without
it the build fails ("Aliased I/O used by plugin ... not enabled").

TensorRT is imported only inside :func:`register_plugin` / :func:`enable_aliased_plugin_io`, so
this module imports on machines without it.

Note: no ``from __future__ import annotations`` here -- ``tensorrt.plugin`` validates the
decorated functions' annotations as objects.
"""

import functools
import re
from dataclasses import dataclass
from typing import Any, List, Sequence, Tuple, Union

from hybridstitch.errors import HybridStitchError

from .aot import AOT_SPLITS, PTX_VERSION, TARGETS, AotKernel, compile_for_target
from .cached_kv import OP_DOMAIN, OP_NAME, OP_VERSION
from .triton_kernel import INPUT_POINTERS, INT_ARGS, OUTPUT_POINTERS

PLUGIN_ID = f"{OP_DOMAIN}::{OP_NAME}"
_REGISTERED: dict[str, object] = {}

# TensorRT releases the plugin is written for: from 10.9 (AOT plugin implementations) up to,
# not including, 12 (checked against the 11.1 sources; a new major release is unreviewed).
TENSORRT_MIN = (10, 9)
TENSORRT_BELOW = (12, 0)


def _leading_ints(version: str) -> tuple[int, ...]:
    """(10, 9, 0, 34) from "10.9.0.34", (11, 0, 0) from "11.0.0.post1"; () when it starts with no number."""
    numbers = []
    for part in str(version).split("."):
        found = re.match(r"\d+", part)
        if found is None:
            break
        numbers.append(int(found.group()))
        if found.end() != len(part):  # "0rc1", "0+cu130": the rest is a suffix
            break
    return tuple(numbers)


def why_tensorrt_unsupported(version: str) -> str | None:
    """Why TensorRT ``version`` (``tensorrt.__version__``) cannot build or run the plugin path (None: it can)."""
    have = _leading_ints(version)
    wanted = f">={TENSORRT_MIN[0]}.{TENSORRT_MIN[1]},<{TENSORRT_BELOW[0]}"
    if len(have) < 2:
        return f"cannot read TensorRT's version from {version!r}; install 'tensorrt{wanted}'"
    if have[:2] < TENSORRT_MIN:
        return (
            f"TensorRT {version} has no ahead-of-time plugin implementations (tensorrt.plugin.aot_impl arrived in "
            f"{TENSORRT_MIN[0]}.{TENSORRT_MIN[1]}); install 'tensorrt{wanted}'"
        )
    if have[:2] >= TENSORRT_BELOW:
        return (
            f"TensorRT {version} is a major release this package was not reviewed against (supported: {wanted}); "
            f"install 'tensorrt{wanted}'"
        )
    return None


def require_supported_tensorrt(version: str) -> None:
    """Raise :class:`HybridStitchError` with :func:`why_tensorrt_unsupported`'s reason."""
    reason = why_tensorrt_unsupported(version)
    if reason is not None:
        raise HybridStitchError(reason)


def target_for_capability(major: int, minor: int) -> str:
    """PTX target for a GPU: sm_90 PTX (Triton emits sm_90a, wgmma) runs only on sm_90 itself,
    so newer GPUs get sm_89 PTX, which the driver JIT-compiles forward; Ampere gets sm_80."""
    capability = 10 * major + minor
    if capability == 90:
        return "sm_90"
    if capability >= 89:
        return "sm_89"
    if capability >= 80:
        return "sm_80"
    raise HybridStitchError(f"compute capability {major}.{minor} is below 8.0; the plugin needs an A100-class GPU or newer")


def kernel_int_args(h, m, d, n, km) -> dict:
    """The kernel's int32 arguments for contiguous tensors, in launch order (``INT_ARGS``).

    ``h, m, d, n, km`` are H, k + T, D, N and k -- Python ints, or TensorRT ``ShapeExpr``s at
    build time (only ``*`` and ``-`` are used, which both support). TensorRT tensors are dense
    row-major, so every stride follows from the shape: query/key/value/out [B, H, m, d],
    caches [B, H, n, d], index [B, km].
    """
    qkv = {"b": h * m * d, "h": m * d, "m": d}
    args = {}
    for t in ("q", "k", "v"):
        args.update({f"stride_{t}{axis}": value for axis, value in qkv.items()})
    args.update({"stride_cb": h * n * d, "stride_ch": n * d, "stride_cn": d})
    args.update({f"stride_o{axis}": value for axis, value in qkv.items()})
    args.update({"stride_ib": km, "H": h, "N": n, "KM": km, "T": m - km})
    assert tuple(args) == INT_ARGS, "kernel_int_args is out of step with the kernel signature"
    return args


@dataclass(frozen=True)
class AotLaunch:
    """How TensorRT launches the AOT kernel: grid, block, dynamic shared memory and the extra int32
    arguments in order. Fields are ints, or TensorRT shape expressions inside ``aot_impl``."""

    grid: tuple[Any, Any, Any]
    block: tuple[int, int, int]
    shared_mem: int
    int_args: tuple[Any, ...]  # in INT_ARGS order


def aot_launch(kernel: AotKernel, b, h, m, d, n, km, splits: int = AOT_SPLITS) -> AotLaunch:
    """The launch of ``kernel`` for query [b, h, m, d] (m = k + T), caches [b, h, n, d], index [b, km].

    Sizes are ints or TensorRT ``ShapeExpr``s (only ``*`` and ``-`` are used). The grid is
    (B*H, splits): one program row per (batch, head), ``splits`` query-block groups each
    (triton_kernel's module docstring); one block of the kernel's warps.
    """
    return AotLaunch(
        grid=(b * h, splits, 1),
        block=(kernel.threads_per_block, 1, 1),
        shared_mem=kernel.shared_mem,
        int_args=tuple(kernel_int_args(h, m, d, n, km).values()),
    )


def tensorrt_kernel_arguments(inputs: Sequence, launch: AotLaunch, outputs: Sequence) -> list:
    """The kernel's arguments in the order TensorRT passes them to an AOT plugin kernel.

    ``inputs``: the plugin's six inputs (query, key, value, cache_k, cache_v, index) and
    ``outputs`` its three (out, cache_k', cache_v'), each as whatever the launcher passes (device
    pointers, tensors); the cache outputs alias the cache inputs, so a launcher that mimics
    TensorRT passes the same buffers there. Returns [*inputs, *launch.int_args, *outputs].
    """
    if len(inputs) != len(INPUT_POINTERS) or len(outputs) != len(OUTPUT_POINTERS):
        raise HybridStitchError(
            f"the plugin has {len(INPUT_POINTERS)} inputs and {len(OUTPUT_POINTERS)} outputs; got {len(inputs)} and {len(outputs)}"
        )
    return [*inputs, *launch.int_args, *outputs]


def plugin_record(target: str, ptx_version: int = PTX_VERSION) -> dict:
    """The manifest's record of the AOT plugin a build embeds: its id, kind, PTX target and PTX ISA
    version (what :func:`hybridstitch.plugins.aot.why_ptx_cannot_load` checks at load)."""
    if target not in TARGETS:
        raise HybridStitchError(f"unknown target {target!r}; choose one of {sorted(TARGETS)}")
    return dict(id=PLUGIN_ID, implementation="aot", ptx_target=target, ptx_version=f"{ptx_version // 10}.{ptx_version % 10}")


@functools.cache
def _compiled(target: str, dtype: str, head_dim: int) -> AotKernel:
    # aot_impl runs for every plugin instance (one per attention layer) and every type
    # combination TensorRT tries: compile each (target, dtype, head_dim) once
    return compile_for_target(target, dtype=dtype, head_dim=head_dim, assemble_cubin=False)


def _import_trtp():
    wanted = f">={TENSORRT_MIN[0]}.{TENSORRT_MIN[1]},<{TENSORRT_BELOW[0]}"
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError as error:
        raise HybridStitchError(
            f"TensorRT's Python package ({wanted}, with tensorrt.plugin) is needed for the "
            f"CachedKVAttention plugin; install it with `pip install 'tensorrt{wanted}'` on a CUDA machine"
        ) from error
    require_supported_tensorrt(trt.__version__)
    if not hasattr(trtp, "aot_impl"):
        raise HybridStitchError(f"TensorRT {trt.__version__} has no tensorrt.plugin.aot_impl; install 'tensorrt{wanted}'")
    return trt, trtp


def register_plugin(target: str | None = None, splits: int = AOT_SPLITS) -> str:
    """Register ``hybridstitch::CachedKVAttention`` with TensorRT's plugin registry; returns its id.

    ``target`` ("sm_80", "sm_89", "sm_90") picks the PTX; by default the current CUDA device's.
    Call before parsing the ONNX model. Idempotent: a second call returns at once (the
    registry keeps the first registration, TensorRT cannot unregister a Python plugin).
    """
    if PLUGIN_ID in _REGISTERED:
        return PLUGIN_ID
    trt, trtp = _import_trtp()
    if target is None:
        import torch

        if not torch.cuda.is_available():
            raise HybridStitchError("no CUDA device to pick the PTX target from; pass target='sm_80'|'sm_89'|'sm_90'")
        target = target_for_capability(*torch.cuda.get_device_capability())
    if target not in TARGETS:
        raise HybridStitchError(f"unknown target {target!r}; choose one of {sorted(TARGETS)}")
    dtype_names = {trt.float16: "fp16", trt.bfloat16: "bf16", trt.float32: "fp32"}

    @trtp.register(PLUGIN_ID)
    def _descriptor(
        query: trtp.TensorDesc,
        key: trtp.TensorDesc,
        value: trtp.TensorDesc,
        cache_k: trtp.TensorDesc,
        cache_v: trtp.TensorDesc,
        index: trtp.TensorDesc,
    ) -> Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
        # out [B, H, k + T, D] like query; the new caches ARE the input caches (aliased, in place)
        return query.like(), cache_k.aliased(), cache_v.aliased()

    @trtp.autotune(PLUGIN_ID)
    def _combinations(
        query: trtp.TensorDesc,
        key: trtp.TensorDesc,
        value: trtp.TensorDesc,
        cache_k: trtp.TensorDesc,
        cache_v: trtp.TensorDesc,
        index: trtp.TensorDesc,
        outputs: Tuple[trtp.TensorDesc],
    ) -> List[trtp.AutoTuneCombination]:
        # 9 I/Os: q, k, v, cache_k, cache_v, index | out, cache_k', cache_v'. "|" ties the
        # float types together (all FP16, all BF16 or all FP32); index is always INT64.
        float_io = "FP16|BF16|FP32"
        types = ", ".join([float_io] * 5 + ["INT64"] + [float_io] * 3)
        return [trtp.AutoTuneCombination(types, "LINEAR")]

    @trtp.aot_impl(PLUGIN_ID)
    def _aot_impl(
        query: trtp.TensorDesc,
        key: trtp.TensorDesc,
        value: trtp.TensorDesc,
        cache_k: trtp.TensorDesc,
        cache_v: trtp.TensorDesc,
        index: trtp.TensorDesc,
        outputs: Tuple[trtp.TensorDesc],
        tactic: int,
    ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        head_dim_expr = query.shape_expr[3]
        if not head_dim_expr.is_constant:
            # the head dim is a compile-time constant of the kernel (tile width, D^-0.5)
            raise HybridStitchError("CachedKVAttention needs a static head dim (query.shape[3]) in the ONNX model")
        kernel = _compiled(target, dtype_names[query.dtype], head_dim_expr.constant_value())

        b, h, m, d = (query.shape_expr[i] for i in range(4))
        n, km = cache_k.shape_expr[2], index.shape_expr[1]
        plan = aot_launch(kernel, b, h, m, d, n, km, splits)
        launch = trtp.KernelLaunchParams()
        launch.grid_x, launch.grid_y, launch.grid_z = plan.grid
        launch.block_x, launch.block_y, launch.block_z = plan.block
        launch.shared_mem = plan.shared_mem

        extra_args = trtp.SymIntExprs(len(plan.int_args))
        for i, value in enumerate(plan.int_args):
            extra_args[i] = trtp.SymInt32(value)
        return kernel.kernel_name, kernel.ptx, launch, extra_args

    _REGISTERED[PLUGIN_ID] = (_descriptor, _combinations, _aot_impl)
    assert OP_VERSION == "1", "tensorrt.plugin registers version '1' only; keep OP_VERSION in step"
    return PLUGIN_ID


def enable_aliased_plugin_io(builder_config) -> None:
    """Turn on the preview feature the in-place cache outputs need (TensorRT >= 10.3)."""
    trt, _ = _import_trtp()
    builder_config.set_preview_feature(trt.PreviewFeature.ALIASED_PLUGIN_IO_10_03, True)
