"""The machine description every report carries."""

import os
import platform

import torch

from hybridstitch.bench.machine import describe_machine, machine_info


def test_machine_info_names_the_machine_versions_and_threads():
    info = machine_info(3)
    assert info["threads"] == 3 and info["cores"] == os.cpu_count()
    assert info["torch"] == torch.__version__ and info["python"] == platform.python_version()
    assert info["cpu"] and info["machine"].startswith(info["cpu"])
    assert ("gpu" in info) == torch.cuda.is_available()
    line = describe_machine(info)
    assert "3 thread(s)" in line and f"torch {torch.__version__}" in line
    if "onnxruntime" in info:
        assert f"onnxruntime {info['onnxruntime']}" in line


def test_describe_names_the_gpu_when_there_is_one():
    info = dict(machine="x", threads=1, torch="2.13", gpu="NVIDIA H200")
    assert describe_machine(info) == "x, 1 thread(s), torch 2.13, GPU NVIDIA H200"
