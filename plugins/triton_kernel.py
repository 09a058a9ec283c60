"""Triton kernel of ``hybridstitch::CachedKVAttention`` (semantics in :mod:`.cached_kv`).

One kernel does both halves of the op, flash-attention style:

1. scatter: the fresh image K/V (rows ``0..k-1`` of ``key``/``value``) are written into the
   cache at ``index`` -- in place, the cache buffers are the op's cache outputs (aliased in
   TensorRT, the caller's tensors in :func:`cached_kv_attention_triton`);
2. attention: the queries attend over [the N cached image tokens, the T text tokens] with an
   online softmax (no score matrix is materialised), fp32 accumulation.

Why "scatter first, then read the cache", and why inside the same kernel
------------------------------------------------------------------------
The queries must see the *updated* cache. Reading fresh K/V through an inverse map
(position -> row of ``key``) would need that map built by an earlier pass over ``index``,
and a TensorRT AOT plugin launches exactly one kernel. So every program writes the fresh
rows of its own (batch, head) itself, then ``tl.debug_barrier()`` (``bar.sync``, which also
orders the CTA's global-memory writes before its later reads), then reads the cache.
Several programs of one (batch, head) write the *same values* to the same addresses, so
whichever write lands, every later read of a masked position sees the fresh row, and no
program ever needs another program's writes. The grid is (B*H, S): program (bh, s) takes
query blocks s, s+S, s+2S, ...; S trades the redundant scatter traffic (S copies of k rows)
against parallelism (B*H*S programs). The launcher picks S from the SM count.

Contract: ``index[b]`` holds distinct positions in ``0..N-1`` (top-k positions are). A
duplicate position ends with one of its fresh rows, as in the reference; an out-of-range
entry is skipped, never written out of bounds.

``triton`` is imported lazily (inside functions): ``import hybridstitch.plugins`` works
without it, and ``TRITON_INTERPRET=1`` is read when the kernel is first built.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from hybridstitch.errors import HybridStitchError

# The kernel's non-constexpr parameters in launch order. The order is the TensorRT AOT
# plugin ABI: input pointers, then the extra int32 arguments, then output pointers
# (``plugins/tensorrt_plugin.py`` builds the extra arguments in this order).
INPUT_POINTERS = ("Q", "K", "V", "CK_IN", "CV_IN", "IDX")
INT_ARGS = (
    "stride_qb", "stride_qh", "stride_qm",
    "stride_kb", "stride_kh", "stride_km",
    "stride_vb", "stride_vh", "stride_vm",
    "stride_cb", "stride_ch", "stride_cn",
    "stride_ob", "stride_oh", "stride_om",
    "stride_ib",
    "H", "N", "KM", "T",
)  # fmt: skip
OUTPUT_POINTERS = ("O", "CK", "CV")
CONSTEXPR_ARGS = ("SM_SCALE", "HEAD_DIM", "BLOCK_D", "BLOCK_M", "BLOCK_N", "DOT_PRECISION")


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch shape. The defaults are the usual FlashAttention-2 choice for
    head_dim 64 on sm_80..sm_90 (Triton's fused-attention tutorial uses the same)."""

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            # tl.dot needs each tile side >= 16 and tl.arange a power of two
            if value < 16 or value & (value - 1):
                raise HybridStitchError(f"KernelConfig.{name}={value}: use a power of two >= 16")


def block_d(head_dim: int) -> int:
    """Padded head-dim tile: a power of two >= 16 (tl.dot's minimum), masked beyond head_dim."""
    return max(16, 1 << (head_dim - 1).bit_length())


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs are multiplied in full fp32 ("ieee"), not TF32, so fp32 matches the
    reference to ~1e-6; for 16-bit inputs the setting is moot (fp16/bf16 tensor-core MMA)."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def get_kernel():
    """Build (once) and return the ``@triton.jit`` kernel. Raises ImportError without triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def cached_kv_attention_kernel(
        Q, K, V, CK_IN, CV_IN, IDX,
        stride_qb, stride_qh, stride_qm,
        stride_kb, stride_kh, stride_km,
        stride_vb, stride_vh, stride_vm,
        stride_cb, stride_ch, stride_cn,
        stride_ob, stride_oh, stride_om,
        stride_ib,
        H, N, KM, T,
        O, CK, CV,
        SM_SCALE: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        # Layouts (last dim contiguous): Q/K/V/O [B, H, KM + T, HEAD_DIM], CK/CV [B, H, N, HEAD_DIM],
        # IDX [B, KM] int64. CK_IN/CV_IN are the cache inputs, unused: the cache outputs CK/CV
        # alias them (same memory), and all cache reads go through CK/CV after the scatter.
        pid_bh = tl.program_id(0)
        split = tl.program_id(1)
        num_splits = tl.num_programs(1)
        # int64 offsets: B*H*N*D passes 2**31 for long sequences / large batches
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        if HEAD_DIM == BLOCK_D:
            # an all-true constant folds away, so the masks stay constant along the head dim
            # and the loads vectorise (a computed offs_d < HEAD_DIM can defeat that analysis)
            d_ok = tl.full([BLOCK_D], 1, tl.int1)
        else:
            d_ok = offs_d < HEAD_DIM

        q_base = Q + b * stride_qb + h * stride_qh
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        ck_base = CK + b * stride_cb + h * stride_ch
        cv_base = CV + b * stride_cb + h * stride_ch
        o_base = O + b * stride_ob + h * stride_oh
        offs_n = tl.arange(0, BLOCK_N)

        # 1. scatter this (b, h)'s fresh image rows into the cache (see module docstring)
        for j0 in range(0, KM, BLOCK_N):
            rows = j0 + offs_n  # [BLOCK_N] rows of key/value = columns of index
            pos = tl.load(IDX + b * stride_ib + rows, mask=rows < KM, other=-1)  # int64
            ok = (rows < KM) & (pos >= 0) & (pos < N)
            mask = ok[:, None] & d_ok[None, :]  # [BLOCK_N, BLOCK_D]
            fresh_k = tl.load(k_base + rows[:, None] * stride_km + offs_d[None, :], mask=mask)
            tl.store(ck_base + pos[:, None] * stride_cn + offs_d[None, :], fresh_k, mask=mask)
            fresh_v = tl.load(v_base + rows[:, None] * stride_vm + offs_d[None, :], mask=mask)
            tl.store(cv_base + pos[:, None] * stride_cn + offs_d[None, :], fresh_v, mask=mask)
        # every thread's scatter is visible to the whole CTA before any cache read below
        tl.debug_barrier()

        # 2. attention over [cache (N image tokens), text K/V (T tokens)], this program's query blocks
        qk_scale = SM_SCALE * 1.4426950408889634  # D^-0.5 * log2(e)
        num_m_blocks = tl.cdiv(KM + T, BLOCK_M)
        for mb in range(split, num_m_blocks, num_splits):
            offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
            m_ok = offs_m < KM + T
            q = tl.load(
                q_base + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :],
                other=0.0,
            )  # [BLOCK_M, BLOCK_D]
            # running max starts finite so a fully masked tile gives p = 0, never NaN
            m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

            # two key segments, one loop body: the cache (N image tokens), then the text
            # rows of key/value (T tokens after the k masked rows); static_range unrolls at
            # compile time, so each segment gets its own specialised loop
            for seg in tl.static_range(2):
                if seg == 0:
                    kseg, vseg, sk, sv, count = ck_base, cv_base, stride_cn, stride_cn, N
                else:
                    kseg, vseg, sk, sv, count = k_base + KM * stride_km, v_base + KM * stride_vm, stride_km, stride_vm, T
                for n0 in range(0, count, BLOCK_N):
                    cols = n0 + offs_n
                    valid = cols < count
                    kt = tl.load(
                        kseg + cols[None, :] * sk + offs_d[:, None],
                        mask=valid[None, :] & d_ok[:, None],
                        other=0.0,
                    )  # [BLOCK_D, BLOCK_N]
                    v = tl.load(
                        vseg + cols[:, None] * sv + offs_d[None, :],
                        mask=valid[:, None] & d_ok[None, :],
                        other=0.0,
                    )  # [BLOCK_N, BLOCK_D]
                    # scores in the log2 domain: exp2(x * log2(e)) == exp(x), one multiply cheaper
                    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N] fp32
                    s = tl.where(valid[None, :], s, float("-inf"))
                    m_new = tl.maximum(m_i, tl.max(s, axis=1))  # [BLOCK_M]
                    alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old max
                    p = tl.exp2(s - m_new[:, None])  # [BLOCK_M, BLOCK_N], 0 at masked keys
                    l_i = l_i * alpha + tl.sum(p, axis=1)
                    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
                    m_i = m_new

            out = acc / l_i[:, None]  # l_i >= 1: the row max contributes exp2(0)
            tl.store(
                o_base + offs_m[:, None] * stride_om + offs_d[None, :],
                out.to(O.dtype.element_ty),
                mask=m_ok[:, None] & d_ok[None, :],
            )

    return cached_kv_attention_kernel


@functools.cache
def interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter (``TRITON_INTERPRET=1``) cannot run this kernel here; None when it can.

    The kernel loops over run-time sizes (``range(0, KM, BLOCK_N)``), which the interpreter turns
    into Python ints through ``int()`` of a one-element numpy array. Triton 3.6 does exactly
    that, and recent NumPy refuses it ("only 0-dimensional arrays can be converted to Python
    scalars": 2.4.6 does, 2.3.5 did not, both checked with 3.6); Triton 3.9 squeezes the array first. Only the interpreter is affected: compiled
    kernels and the AOT PTX never run this Python. Probed with a three-line kernel, so any other
    Triton / NumPy pair is judged by what it does, not by its version numbers.
    """
    import numpy as np
    import triton
    import triton.language as tl

    @triton.jit
    def _probe(X, n):
        for i in range(0, n, 1):
            tl.store(X + i, i)

    if type(_probe).__name__ != "InterpretedFunction":
        return None  # not interpreting: nothing to probe
    x = torch.zeros(2, dtype=torch.int32)
    try:
        _probe[(1,)](x, 2)
    except Exception as error:  # noqa: BLE001 -- the interpreter wraps what it hits in its own types
        if "0-dimensional" not in str(error):
            raise
        return (
            f"Triton {triton.__version__}'s interpreter cannot run loops over run-time sizes with NumPy {np.__version__} "
            "(it calls int() on one-element arrays, which this NumPy refuses; Triton 3.9 does not): use triton>=3.9, or "
            "numpy<2.4 with this Triton, for TRITON_INTERPRET=1 runs. Compiled kernels are not affected"
        )
    if x.tolist() != [0, 1]:
        return f"Triton {triton.__version__}'s interpreter ran a run-time loop wrong ({x.tolist()} instead of [0, 1])"
    return None


def _check_inputs(query, key, value, cache_k, cache_v, index) -> None:
    if query.dim() != 4 or key.shape != query.shape or value.shape != query.shape:
        raise HybridStitchError(
            f"query/key/value must share one shape [B, H, k + T, D]; got {tuple(query.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)}"
        )
    b, h, m, d = query.shape
    if cache_k.dim() != 4 or cache_k.shape != cache_v.shape or cache_k.shape[:2] != (b, h) or cache_k.shape[3] != d:
        raise HybridStitchError(
            f"cache_k/cache_v must be [B, H, N, D] = [{b}, {h}, N, {d}]; got {tuple(cache_k.shape)}, "
            f"{tuple(cache_v.shape)}"
        )
    if index.dim() != 2 or index.shape[0] != b or index.shape[1] > m:
        raise HybridStitchError(f"index must be [B, k] with k <= {m} (query rows); got {tuple(index.shape)}")
    if index.dtype != torch.int64:
        raise HybridStitchError(f"index must be int64; got {index.dtype}")
    dtypes = {t.dtype for t in (query, key, value, cache_k, cache_v)}
    if len(dtypes) != 1 or query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise HybridStitchError(
            f"query/key/value/caches must share one dtype among float16, bfloat16, float32; got {sorted(map(str, dtypes))}"
        )
    devices = {t.device for t in (query, key, value, cache_k, cache_v, index)}
    if len(devices) != 1:
        raise HybridStitchError(f"all inputs must be on one device; got {sorted(map(str, devices))}")
    if cache_k.shape[2] == 0:
        raise HybridStitchError("the cache is empty (N = 0): run a full large step to fill it first")
    if cache_k.stride() != cache_v.stride() or cache_k.stride(3) != 1:
        # the kernel shares one set of cache strides and needs a contiguous head dim; the
        # caches are updated in place, so they cannot be silently copied to another layout
        raise HybridStitchError(
            f"cache_k and cache_v need equal strides with a contiguous last dim; got {cache_k.stride()} "
            f"and {cache_v.stride()} (allocate them with torch.empty / torch.zeros)"
        )


def choose_splits(batch_heads: int, num_m_blocks: int, device: torch.device) -> int:
    """S of the (B*H, S) grid: about four waves of programs over the SMs, then evened out so
    every program gets the same number of query blocks (no half-idle tail). Each split costs
    one more copy of the scatter writes."""
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    wanted = max(1, min(num_m_blocks, math.ceil(4 * sm_count / max(1, batch_heads))))
    per_program = math.ceil(num_m_blocks / wanted)
    return math.ceil(num_m_blocks / per_program)


def cached_kv_attention_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    index: torch.Tensor,
    *,
    config: KernelConfig | None = None,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the op with the Triton kernel; ``cache_k``/``cache_v`` are updated IN PLACE.

    Returns ``(out, cache_k, cache_v)`` -- the same cache tensor objects, now holding the
    fresh rows. Shapes as in :mod:`.cached_kv`. On CPU it needs ``TRITON_INTERPRET=1`` in
    the environment before the first call (the tests' way to run it without a GPU).
    """
    _check_inputs(query, key, value, cache_k, cache_v, index)
    if splits is not None and splits < 1:
        raise HybridStitchError(f"splits={splits}: use at least 1 (or None to pick from the GPU's SM count)")
    config = config or KernelConfig()
    kernel = get_kernel()
    if not query.is_cuda and type(kernel).__name__ != "InterpretedFunction":
        raise HybridStitchError(
            f"the Triton kernel runs on CUDA tensors (got {query.device}); on CPU use the reference, or set "
            "TRITON_INTERPRET=1 before the first call to run Triton's interpreter"
        )
    if not query.is_cuda and (problem := interpreter_problem()) is not None:
        raise HybridStitchError(problem)
    b, h, m, d = query.shape
    n = cache_k.shape[2]
    km = index.shape[1]

    # the kernel assumes a contiguous last dim; diffusers' [B, S, H, D] -> [B, H, S, D]
    # transpose keeps it, so these are no-ops on the usual inputs
    query, key, value = (t if t.stride(3) == 1 else t.contiguous() for t in (query, key, value))
    # [B, k], row stride k; with k = 0 a 1-column stand-in, never read, so the kernel is not
    # handed the null data pointer of an empty CUDA tensor
    index = index.contiguous() if km > 0 else torch.zeros((b, 1), dtype=torch.int64, device=query.device)
    out = torch.empty((b, h, m, d), dtype=query.dtype, device=query.device)  # [B, H, k + T, D]
    if m == 0 or b * h == 0:  # nothing to attend or write (k <= m, so k = 0 too)
        return out, cache_k, cache_v

    num_m_blocks = -(-m // config.block_m)  # ceil
    s = splits if splits is not None else choose_splits(b * h, num_m_blocks, query.device)
    kernel[(b * h, s)](
        query, key, value, cache_k, cache_v, index,
        query.stride(0), query.stride(1), query.stride(2),
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        cache_k.stride(0), cache_k.stride(1), cache_k.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        index.stride(0),
        h, n, km, m - km,
        out, cache_k, cache_v,
        SM_SCALE=d**-0.5,
        HEAD_DIM=d,
        BLOCK_D=block_d(d),
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        DOT_PRECISION=dot_precision(query.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        enable_fp_fusion=True,  # FMA contraction, Triton's historical default (said, to silence 3.9's warning)
    )  # fmt: skip
    return out, cache_k, cache_v

