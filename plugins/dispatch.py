"""Which form of the cached-KV attention op a torch forward runs: the export op while tracing for
ONNX (:func:`export_mode`), the Triton kernel on CUDA, the reference elsewhere.

Kept apart from the op's definition (:mod:`.cached_kv`), which imports none of its forms.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

from .cached_kv import cached_kv_attention_reference


def cached_kv_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    index: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op as the torch backend calls it.

    Dispatches to the registered ``torch.library`` op when one exists for the device
    (the Triton kernel on CUDA), else the reference. ONNX export replaces this call by
    one ``hybridstitch::CachedKVAttention`` node (see ``plugins/onnx_op.py``): under
    :func:`export_mode` it calls the opaque export op the ONNX translation table maps.
    """
    if getattr(_export_state, "active", False):
        from .onnx_op import cached_kv_attention_export

        return cached_kv_attention_export(query, key, value, cache_k, cache_v, index)
    if query.is_cuda:
        # the Triton kernel behind hybridstitch::cached_kv_attention (importing registers it)
        from .torch_op import cached_kv_attention_op

        return cached_kv_attention_op(query, key, value, cache_k, cache_v, index)
    return cached_kv_attention_reference(query, key, value, cache_k, cache_v, index)


# Per thread, so an export never changes what another thread's torch forward runs.
_export_state = threading.local()


@contextlib.contextmanager
def export_mode() -> Iterator[None]:
    """While active (in this thread), :func:`cached_kv_attention` calls the opaque
    ``hybridstitch::cached_kv_attention_export`` op, which ``torch.export`` keeps as one node
    and the ONNX exporter turns into one ``CachedKVAttention`` node. Outside it the op is
    the reference, bit for bit."""
    previous = getattr(_export_state, "active", False)
    _export_state.active = True
    try:
        yield
    finally:
        _export_state.active = previous
