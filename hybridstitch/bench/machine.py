"""One description of the machine a measurement ran on, for every report.

Numbers from a shared 2-core runner and from an H100 must never be confused, so every report
carries the CPU model, its core count, the threads the run used, the library versions and the
GPU when there is one.
"""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux, or no procfs in a container
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str | None:
    """The first CUDA device's name, or None without one (never initialises CUDA on a CPU build)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(0)


def machine_info(threads: int) -> dict:
    """Date, machine, versions and the thread count of a run, as JSON-ready fields.

    ``machine`` is the one-line summary the Markdown reports print; the other fields are the
    same facts split out for scripts that compare reports.
    """
    import torch

    cpu = cpu_model()
    cores = os.cpu_count()
    info = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu}, {cores} logical cores, {platform.system()} {platform.machine()}",
        "cpu": cpu,
        "cores": cores,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": threads,
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    gpu = gpu_name()
    if gpu is not None:
        info["gpu"] = gpu
    return info


def describe_machine(info: dict) -> str:
    """:func:`machine_info` in one line: machine, threads, versions, GPU."""
    parts = [info["machine"], f"{info['threads']} thread(s)", f"torch {info['torch']}"]
    if "onnxruntime" in info:
        parts.append(f"onnxruntime {info['onnxruntime']}")
    if "gpu" in info:
        parts.append(f"GPU {info['gpu']}")
    return ", ".join(parts)
