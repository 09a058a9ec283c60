"""The second compiler path: the torch graphs compiled by Torch-TensorRT (``--compiler torch-tensorrt``).

Where the ONNX path parses the exported ONNX graph, this one hands the same torch graph modules
(``export/graphs.py``: the full small, the full large with its cache outputs, the masked large per
bucket, fp32 blocks included) to ``torch_tensorrt.dynamo``: ``torch.export`` traces them on the
GPU, and ``convert_exported_program_to_serialized_trt_engine`` turns each into one serialized,
explicitly typed TensorRT engine, saved under the same manifest as the ONNX-path engines (build
``<target>/trt<version>/torch-tensorrt-plugin``), so the two can be compared on one GPU.

The attention op. On CUDA the masked graph calls the ``torch.library`` op
``hybridstitch::cached_kv_attention`` (``plugins/torch_op.py``: a Triton kernel). Torch-TensorRT
generates a TensorRT plugin for it from the op itself
(``torch_tensorrt.dynamo.conversion.plugins.custom_op``: a plugin descriptor from the op's fake
implementation, a JIT implementation that calls the op on TensorRT's stream, and the converter
that puts the plugin in the network). Two consequences, both recorded in the manifest:

- it is a JIT (Python) plugin: loading these engines needs Python with torch, torch-tensorrt and
  this package (``plugins/torch_tensorrt_plugin.py``'s ``register_op_plugin`` runs before deserialising), unlike the ONNX path's AOT
  plugin whose PTX lives in the engine;
- the op is functional (it returns fresh caches: the plugin's cache outputs are not aliased to
  its inputs), so the Triton kernel runs on a copy of each cache. The AOT plugin of the ONNX path
  (``plugins/tensorrt_plugin.py``) cannot stand in for it: that kernel writes only the k fresh
  rows and relies on the outputs being the (aliased) input caches.

Versions and precisions (refused up front, with the reason, rather than failing deep inside):

- Torch-TensorRT >= 2.13 (:func:`why_torch_tensorrt_unsupported`). 2.6 has no ``custom_op``;
  2.7-2.12 generate a plugin with a single output (their descriptor returns ``Tuple[TensorDesc]``
  and sizes only the first output), and this op has three. Each release pins one torch minor and one
  TensorRT minor (2.13: torch 2.13 and TensorRT 11.0; 2.14: 2.14 and 11.1).
- no bf16 (:func:`check_torch_tensorrt_precision`): the generated JIT plugin hands TensorRT's
  tensors to torch through ``__cuda_array_interface__``, which ``tensorrt.plugin`` refuses for
  BF16 ("Handling DataType.BF16 via '__cuda_array_interface__' is not supported"), so a bf16
  engine would build and then fail at its first inference. bf16 builds go through the ONNX path.

Torch-TensorRT is imported lazily, like TensorRT: this module imports without either.
Written against Torch-TensorRT 2.13's sources; it has not run in this workplace (no TensorRT
here), see docs/tensorrt.md.
"""

from __future__ import annotations

import os

import torch

from hybridstitch.errors import HybridStitchError
from hybridstitch.plugins.torch_tensorrt_plugin import register_op_plugin, torch_tensorrt_module


def check_torch_tensorrt_precision(precision: str) -> None:
    """Refuse a precision the Torch-TensorRT path cannot run. Called where the export request is
    checked, before any graph is exported: bf16 builds fine there and fails only at the first inference."""
    if precision == "bf16":
        raise HybridStitchError(
            "--compiler torch-tensorrt cannot run bf16 engines: Torch-TensorRT's generated attention plugin passes "
            "tensors to torch through __cuda_array_interface__, which TensorRT refuses for BF16, so the engine would "
            "fail at its first inference. Use --compiler onnx for bf16, or --precision fp16"
        )


def compile_settings(options, timing_cache: str | None) -> dict:
    """``convert_exported_program_to_serialized_trt_engine`` keyword arguments for ``options``."""
    settings = dict(
        use_explicit_typing=True,  # the graph's dtypes (fp16/bf16, fp32 blocks), as the ONNX path's strong typing
        min_block_size=1,
        require_full_compilation=True,  # one engine per graph, no fallback to torch
        immutable_weights=True,
    )
    if options.builder_optimization_level is not None:
        settings["optimization_level"] = options.builder_optimization_level
    if options.hardware_compatibility == "ampere_plus":
        settings["hardware_compatible"] = True
    if timing_cache is not None:
        settings["timing_cache_path"] = timing_cache
    return settings


class EngineBytesFromTorch:
    """A torch graph module and example inputs -> a serialized TensorRT engine, through Torch-TensorRT.

    ``dynamic_shapes`` (``torch.export``'s, for the symbolic batch and k) and ``ranges`` (per
    example input: None, or its (min, opt, max) shape) make one engine with one dynamic profile:
    Torch-TensorRT builds a single optimization profile per engine. The module and inputs are
    moved to the GPU for tracing and compiling, then the module goes back where it was."""

    def __init__(self, module: torch.nn.Module, example: tuple, options, timing_cache: str | None,
                 dynamic_shapes: dict | None = None, ranges: list | None = None):
        self.module, self.example, self.options, self.timing_cache = module, example, options, timing_cache
        self.dynamic_shapes, self.ranges = dynamic_shapes, ranges or [None] * len(example)

    def __call__(self) -> bytes:
        # the graph's own dtypes decide (a bf16 export, its fp32 blocks aside): refused before the
        # long compile, in case the request was not checked with check_torch_tensorrt_precision
        dtypes = {p.dtype for p in self.module.parameters()} | {x.dtype for x in self.example if torch.is_tensor(x)}
        if torch.bfloat16 in dtypes:
            check_torch_tensorrt_precision("bf16")
        torch_tensorrt = torch_tensorrt_module()
        register_op_plugin()
        if self.timing_cache is not None:
            os.makedirs(os.path.dirname(self.timing_cache) or ".", exist_ok=True)
        device = torch.device("cuda", torch.cuda.current_device())
        previous = next(self.module.parameters()).device
        example = tuple(x.to(device) for x in self.example)
        try:
            with torch.no_grad():
                self.module.to(device)
                # on CUDA tensors the masked graph's attention traces to the torch.library op
                program = torch.export.export(self.module.eval(), example, dynamic_shapes=self.dynamic_shapes,
                                              strict=False)
                inputs = [
                    x if r is None else torch_tensorrt.Input(min_shape=r[0], opt_shape=r[1], max_shape=r[2], dtype=x.dtype)
                    for x, r in zip(example, self.ranges)
                ]
                data = torch_tensorrt.dynamo.convert_exported_program_to_serialized_trt_engine(
                    program, arg_inputs=inputs, **compile_settings(self.options, self.timing_cache)
                )
        except HybridStitchError:
            raise
        except Exception as e:  # Torch-TensorRT raises its own and torch's exception types
            raise HybridStitchError(
                f"Torch-TensorRT could not compile the graph: {type(e).__name__}: {e}. Try --compiler onnx"
            ) from e
        finally:
            self.module.to(previous)
        if not data:
            raise HybridStitchError("Torch-TensorRT returned no engine (see its log above); try --compiler onnx")
        return bytes(data)


__all__ = ["EngineBytesFromTorch", "check_torch_tensorrt_precision", "compile_settings"]
