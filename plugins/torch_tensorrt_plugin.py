"""The attention op as Torch-TensorRT's generated (JIT) plugin.

Torch-TensorRT turns the ``torch.library`` op ``hybridstitch::cached_kv_attention``
(:mod:`.torch_op`) into a TensorRT plugin itself (``torch_tensorrt.dynamo.conversion.plugins.custom_op``):
a descriptor from the op's fake implementation, a JIT implementation that calls the op on
TensorRT's stream, and the converter. The builder needs it before compiling a masked graph, the
runtime before deserialising an engine that holds it; both call :func:`register_op_plugin`.
Torch-TensorRT is imported lazily: this module imports without it.
"""

from __future__ import annotations

from hybridstitch.errors import HybridStitchError

# The torch op Torch-TensorRT turns into a plugin; its plugin id is the op's qualified name.
OP_PLUGIN = "hybridstitch::cached_kv_attention"
_REGISTERED: set[str] = set()


def torch_tensorrt_module():
    """``torch_tensorrt``, or a HybridStitchError saying how to get it."""
    try:
        import torch_tensorrt
    except ImportError as e:
        raise HybridStitchError(
            "--compiler torch-tensorrt needs torch-tensorrt (pip install torch-tensorrt, matching your torch and "
            "TensorRT versions), or build with --compiler onnx"
        ) from e
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


__all__ = ["OP_PLUGIN", "register_op_plugin", "torch_tensorrt_module"]
