"""``torch.library`` custom op ``hybridstitch::cached_kv_attention``.

Functional at the torch level: it returns ``(out, new_cache_k, new_cache_v)`` and never
mutates its inputs, like :func:`.cached_kv.cached_kv_attention_reference`, so it traces,
compiles and exports like any other op. Implementations:

- CPU (and any device without its own kernel): the reference;
- CUDA: the Triton kernel, on clones of the caches (the kernel updates the cache in place;
  cloning keeps the op functional). Callers that own the cache and want the in-place update
  without the copy call :func:`.triton_kernel.cached_kv_attention_triton` directly;
- fake/meta: shapes only, for ``torch.compile``/export tracing.

Importing this module registers the op; ``torch.ops.hybridstitch.cached_kv_attention``
exists from then on.
"""

from __future__ import annotations

import functools
import warnings

import torch

from .cached_kv import cached_kv_attention_reference

OP_QUALNAME = "hybridstitch::cached_kv_attention"


@torch.library.custom_op(OP_QUALNAME, mutates_args=())
def cached_kv_attention_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    index: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """query/key/value [B, H, k + T, D], caches [B, H, N, D], index [B, k] int64 ->
    (out [B, H, k + T, D], new_cache_k, new_cache_v); see :mod:`.cached_kv`."""
    out, new_k, new_v = cached_kv_attention_reference(query, key, value, cache_k, cache_v, index)
    # SDPA's CPU kernel may return a transposed view; a custom op's output layout must not
    # depend on the backend's internals, and the fake impl promises contiguous [B, H, k + T, D]
    return out.contiguous(), new_k, new_v


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        warnings.warn(
            "triton is not installed: hybridstitch::cached_kv_attention runs the plain-torch "
            "reference on CUDA (slower). Install it with `pip install triton`.",
            stacklevel=3,
        )
        return False
    return True


@cached_kv_attention_op.register_kernel("cuda")
def _cached_kv_attention_cuda(query, key, value, cache_k, cache_v, index):
    if not _triton_available():
        out, new_k, new_v = cached_kv_attention_reference(query, key, value, cache_k, cache_v, index)
        return out.contiguous(), new_k, new_v
    from .triton_kernel import cached_kv_attention_triton

    # clones keep the op functional; clone() keeps the caches' layout (the kernel needs a
    # contiguous head dim and equal K/V strides, checked by the launcher)
    new_k, new_v = cache_k.clone(), cache_v.clone()
    return cached_kv_attention_triton(query, key, value, new_k, new_v, index)


@cached_kv_attention_op.register_fake
def _cached_kv_attention_fake(query, key, value, cache_k, cache_v, index):
    # out: [B, H, k + T, D] contiguous; caches keep their layout (as clone/scatter do)
    return query.new_empty(query.shape), torch.empty_like(cache_k), torch.empty_like(cache_v)
