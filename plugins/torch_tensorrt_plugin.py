"""The attention op as Torch-TensorRT's generated (JIT) plugin.

Torch-TensorRT turns the ``torch.library`` op ``hybridstitch::cached_kv_attention``
(:mod:`.torch_op`) into a TensorRT plugin itself (``torch_tensorrt.dynamo.conversion.plugins.custom_op``):
a descriptor from the op's fake implementation, a JIT implementation that calls the op on
TensorRT's stream, and the converter. The builder needs it before compiling a masked graph, the
runtime before deserialising an engine that holds it; both call :func:`register_op_plugin`.
Torch-TensorRT is imported lazily: this module imports without it.
"""

from __future__ import annotations

import re

from hybridstitch.errors import HybridStitchError

# The torch op Torch-TensorRT turns into a plugin; its plugin id is the op's qualified name.
OP_PLUGIN = "hybridstitch::cached_kv_attention"
_REGISTERED: set[str] = set()
# First Torch-TensorRT whose generated plugin has the op's three outputs: 2.6 has no
# plugins.custom_op, 2.7-2.12 generate plugins with one output.
TORCH_TENSORRT_MIN = (2, 13)
_INSTALL = "pip install 'torch-tensorrt>=2.13' (with torch 2.13+), or build with --compiler onnx"


def why_torch_tensorrt_unsupported(version: str) -> str | None:
    """Why Torch-TensorRT ``version`` (``torch_tensorrt.__version__``) cannot compile the masked graphs (None: it can)."""
    found = re.match(r"(\d+)\.(\d+)", str(version).strip())
    if found is None:
        return f"cannot read Torch-TensorRT's version from {version!r}; {_INSTALL}"
    have = (int(found.group(1)), int(found.group(2)))
    if have >= TORCH_TENSORRT_MIN:
        return None
    what = ("has no torch_tensorrt.dynamo.conversion.plugins.custom_op" if have < (2, 7)
            else "generates plugins with one output, and the attention op has three (out and both caches)")
    return f"Torch-TensorRT {version} {what}; {_INSTALL}"


def torch_tensorrt_module():
    """``torch_tensorrt`` (a version that can build the op's plugin), or a HybridStitchError saying how to get it."""
    try:
        import torch_tensorrt
    except ImportError as e:
        raise HybridStitchError(f"--compiler torch-tensorrt needs torch-tensorrt: {_INSTALL}") from e
    reason = why_torch_tensorrt_unsupported(getattr(torch_tensorrt, "__version__", "?"))
    if reason is not None:
        raise HybridStitchError(reason)
    return torch_tensorrt


def register_op_plugin() -> str:
    """Have Torch-TensorRT generate (once per process) the plugin and converter of
    ``hybridstitch::cached_kv_attention``; returns the plugin id. Needed before compiling a masked
    graph and before deserialising an engine that holds the plugin."""
    if OP_PLUGIN in _REGISTERED:
        return OP_PLUGIN
    torch_tensorrt_module()
    from torch_tensorrt.dynamo.conversion.plugins import custom_op

    from . import torch_op  # noqa: F401  (registers torch.ops.hybridstitch.cached_kv_attention)

    # one engine serves every k (and batch) through a dynamic profile
    custom_op(OP_PLUGIN, supports_dynamic_shapes=True)
    _REGISTERED.add(OP_PLUGIN)
    return OP_PLUGIN


__all__ = ["OP_PLUGIN", "TORCH_TENSORRT_MIN", "register_op_plugin", "torch_tensorrt_module", "why_torch_tensorrt_unsupported"]
