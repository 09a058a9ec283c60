"""The Torch-TensorRT path's refusals: versions whose generated plugin cannot hold the op, and bf16."""

import sys
import types

import pytest
import torch

from hybridstitch.errors import HybridStitchError
from hybridstitch.engine.builds import TensorRTOptions
from hybridstitch.export.torch_tensorrt_build import EngineBytesFromTorch, check_torch_tensorrt_precision
from hybridstitch.plugins.torch_tensorrt_plugin import torch_tensorrt_module, why_torch_tensorrt_unsupported


@pytest.mark.parametrize(
    "version, refused",
    [("2.6.0", "no torch_tensorrt.dynamo.conversion.plugins.custom_op"), ("2.7.0", "one output"),
     ("2.12.1+cu130", "one output"), ("2.13.0", None), ("2.13.0+cu130", None), ("2.14.0.dev20260901", None),
     ("3.0.0", None), ("unknown", "cannot read")],
)  # fmt: skip
def test_torch_tensorrt_versions(version, refused):
    reason = why_torch_tensorrt_unsupported(version)
    if refused is None:
        assert reason is None
    else:
        assert refused in reason and "torch-tensorrt>=2.13" in reason and "--compiler onnx" in reason


def test_an_old_torch_tensorrt_is_refused_on_import(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_tensorrt", types.SimpleNamespace(__version__="2.9.0"))
    with pytest.raises(HybridStitchError, match="Torch-TensorRT 2.9.0 generates plugins with one output"):
        torch_tensorrt_module()
    monkeypatch.setitem(sys.modules, "torch_tensorrt", types.SimpleNamespace(__version__="2.13.0"))
    assert torch_tensorrt_module().__version__ == "2.13.0"


def test_bf16_is_refused_with_the_reason():
    check_torch_tensorrt_precision("fp16")
    check_torch_tensorrt_precision("fp32")
    with pytest.raises(HybridStitchError, match="__cuda_array_interface__.*--compiler onnx"):
        check_torch_tensorrt_precision("bf16")


@pytest.mark.parametrize("where", ["weights", "inputs"])
def test_a_bf16_graph_is_refused_before_compiling(monkeypatch, where):
    # before Torch-TensorRT is even imported: the check costs nothing, the compile minutes
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)  # importing it would raise ImportError
    module = torch.nn.Linear(4, 4)
    example = (torch.zeros(1, 4),)
    if where == "weights":
        module = module.to(torch.bfloat16)
    else:
        example = (torch.zeros(1, 4, dtype=torch.bfloat16),)
    with pytest.raises(HybridStitchError, match="cannot run bf16 engines"):
        EngineBytesFromTorch(module, example, TensorRTOptions(compiler="torch-tensorrt"), timing_cache=None)()
    with pytest.raises(HybridStitchError, match="needs torch-tensorrt"):
        EngineBytesFromTorch(torch.nn.Linear(4, 4), (torch.zeros(1, 4),), TensorRTOptions(compiler="torch-tensorrt"), None)()


def test_an_export_request_for_bf16_through_torch_tensorrt_is_refused_at_once(tiny_dirs):
    from hybridstitch.export import ExportRequest

    with pytest.raises(HybridStitchError, match="cannot run bf16 engines"):
        ExportRequest(large=tiny_dirs[0], small=tiny_dirs[1], height=64, width=64, precision="bf16", opset=22,
                      backend="tensorrt", tensorrt=TensorRTOptions(compiler="torch-tensorrt"))
