"""TensorRT plugin ``hybridstitch::CachedKVAttention``: a Python ``tensorrt.plugin`` (TensorRT >= 10.8)
with an ahead-of-time Triton implementation, so built engines run without Python.

How the pieces meet:

- The ONNX graph holds one ``CachedKVAttention`` node of domain ``hybridstitch`` per attention
  slot (``plugins/onnx_op.py``). ``plugins/onnx_for_tensorrt.py`` strips its local function and
  adds ``plugin_namespace="hybridstitch"``; TensorRT's ONNX parser then finds this plugin's
  creator by op type (name ``CachedKVAttention``), namespace and version ``"1"`` (the only
  version ``tensorrt.plugin`` registers; it equals ``OP_VERSION``).
- :func:`register_plugin` registers the descriptor, the type/format combinations and the AOT
  implementation. The AOT implementation returns the PTX from :mod:`.aot` (compiled for the
  build GPU's target, or the one named), its launch grid as symbolic expressions of the input
  shapes, and the kernel's int32 arguments (strides and sizes) as symbolic expressions too.
  TensorRT embeds the PTX in the engine and launches it with (input pointers, those int32
  arguments, output pointers) -- the kernel's parameter order.

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
from typing import List, Tuple, Union

from hybridstitch.errors import HybridStitchError

from .aot import AOT_SPLITS, TARGETS, AotKernel, compile_for_target
from .cached_kv import OP_DOMAIN, OP_NAME, OP_VERSION
from .triton_kernel import INT_ARGS

PLUGIN_ID = f"{OP_DOMAIN}::{OP_NAME}"
_REGISTERED: dict[str, object] = {}


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


@functools.cache
def _compiled(target: str, dtype: str, head_dim: int) -> AotKernel:
    # aot_impl runs for every plugin instance (one per attention layer) and every type
    # combination TensorRT tries: compile each (target, dtype, head_dim) once
    return compile_for_target(target, dtype=dtype, head_dim=head_dim, assemble_cubin=False)


def _import_trtp():
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError as error:
        raise HybridStitchError(
            "TensorRT's Python package (>= 10.8, with tensorrt.plugin) is needed for the "
            "CachedKVAttention plugin; install it with `pip install 'tensorrt>=10.8'` on a CUDA machine"
        ) from error
    if not hasattr(trtp, "aot_impl"):
        raise HybridStitchError(
            f"TensorRT {trt.__version__} has no tensorrt.plugin.aot_impl; the plugin needs TensorRT >= 10.8"
        )
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
        launch = trtp.KernelLaunchParams()
        launch.grid_x = b * h  # one program row per (batch, head) ...
        launch.grid_y = splits  # ... times `splits` query-block groups (triton_kernel docstring)
        launch.block_x = kernel.threads_per_block
        launch.shared_mem = kernel.shared_mem

        values = list(kernel_int_args(h, m, d, n, km).values())
        extra_args = trtp.SymIntExprs(len(values))
        for i, value in enumerate(values):
            extra_args[i] = trtp.SymInt32(value)
        return kernel.kernel_name, kernel.ptx, launch, extra_args

    _REGISTERED[PLUGIN_ID] = (_descriptor, _combinations, _aot_impl)
    assert OP_VERSION == "1", "tensorrt.plugin registers version '1' only; keep OP_VERSION in step"
    return PLUGIN_ID


def enable_aliased_plugin_io(builder_config) -> None:
    """Turn on the preview feature the in-place cache outputs need (TensorRT >= 10.3)."""
    trt, _ = _import_trtp()
    builder_config.set_preview_feature(trt.PreviewFeature.ALIASED_PLUGIN_IO_10_03, True)
