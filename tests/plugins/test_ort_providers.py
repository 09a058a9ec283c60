"""The GPU parity check's ONNX Runtime: the CUDA provider, or a refusal that says how to fix the install."""

import types

import pytest

from hybridstitch.errors import HybridStitchError
from hybridstitch.plugins.ort_providers import (
    installed_onnxruntime_distributions,
    require_cuda_provider,
    require_session_on_cuda,
)


def _ort(*providers, version="1.30.0"):
    return types.SimpleNamespace(get_available_providers=lambda: list(providers), __version__=version)


def test_gpu_build_alone_gives_cuda_first():
    ort = _ort("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    assert require_cuda_provider(ort, ["onnxruntime-gpu"]) == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_both_builds_installed_is_refused_with_the_swap():
    # microsoft/onnxruntime#26996: the two wheels share one package folder; even when the CUDA
    # provider happens to be listed, the next install or uninstall of either breaks the other
    ort = _ort("CUDAExecutionProvider", "CPUExecutionProvider")
    with pytest.raises(HybridStitchError) as e:
        require_cuda_provider(ort, ["onnxruntime-gpu", "onnxruntime"])
    message = str(e.value)
    assert "onnxruntime and onnxruntime-gpu are installed together" in message and "26996" in message
    assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'onnxruntime-gpu" in message


def test_cpu_build_is_refused_instead_of_a_silent_cpu_parity_check():
    with pytest.raises(HybridStitchError) as e:
        require_cuda_provider(_ort("AzureExecutionProvider", "CPUExecutionProvider"), ["onnxruntime"])
    message = str(e.value)
    assert "has no CUDA provider" in message and "AzureExecutionProvider, CPUExecutionProvider" in message
    assert "pip install 'onnxruntime-gpu" in message and "--verify none" in message


def test_a_session_that_fell_back_to_the_cpu_is_refused():
    require_session_on_cuda(types.SimpleNamespace(get_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]))
    with pytest.raises(HybridStitchError, match="cuDNN"):
        require_session_on_cuda(types.SimpleNamespace(get_providers=lambda: ["CPUExecutionProvider"]))


def test_installed_distributions_are_read_from_pip_metadata():
    # this machine has the CPU build (a base requirement) and no GPU build
    found = installed_onnxruntime_distributions()
    assert "onnxruntime" in found and "onnxruntime-gpu" not in found
    with pytest.raises(HybridStitchError, match="has no CUDA provider"):
        require_cuda_provider()  # the real module and metadata: the CPU build here
