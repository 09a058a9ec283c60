"""The cached-KV concat attention op, ``hybridstitch::CachedKVAttention``.

One definition (:mod:`.cached_kv`), used by every backend: the torch reference and
``torch.library`` custom op, its ONNX form, the Triton kernel and the TensorRT plugin.
"""

from .cached_kv import OP_DOMAIN, OP_NAME, OP_VERSION, cached_kv_attention_reference
from .dispatch import cached_kv_attention, export_mode

__all__ = [
    "OP_DOMAIN",
    "OP_NAME",
    "OP_VERSION",
    "cached_kv_attention",
    "cached_kv_attention_reference",
    "export_mode",
]
