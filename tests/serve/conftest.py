"""Fixtures of the serving tests: the shipped testbed's ONNX Runtime engines (exported once per
session), the pipeline on them for direct calls, and one running server (module-scoped, stopped in
``finally``) on free loopback ports."""

from __future__ import annotations

import os

import pytest

# The testbed's calibrated preset and guidance (README, calibration): what the tests request.
METHOD, GUIDANCE, STEPS = "testbed-30", 1.25, 12


@pytest.fixture(scope="session")
def testbed_engines(tmp_path_factory) -> str:
    """ONNX Runtime engines of the shipped testbed pair, 32x32, bucket 0.3, fp32."""
    from hybridstitch.demo import testbed_image_size
    from hybridstitch.export import ExportRequest, export_engines
    from hybridstitch.testbed import LARGE_DIR, SMALL_DIR

    out = str(tmp_path_factory.mktemp("testbed-engines"))
    size = testbed_image_size()
    req = ExportRequest(large=LARGE_DIR, small=SMALL_DIR, height=size, width=size, batch=2, buckets=(0.3,), precision="fp32")
    export_engines(req, out, progress=False)
    return out


@pytest.fixture(scope="session")
def direct_pipe(testbed_engines):
    """The pipeline on the same engines, in this process, one thread: what the server must match."""
    from hybridstitch import HybridStitchPipeline

    return HybridStitchPipeline.from_engines(testbed_engines, num_threads=1)


def direct_call(pipe, prompt: str, seed: int, method: str = METHOD, steps: int = STEPS, guidance: float = GUIDANCE):
    """A direct pipeline call, written out here rather than through the runner, so the tests compare
    the server against the pipeline itself. Returns (uint8 [H, W, C], trace dict)."""
    import numpy as np
    import torch

    out = pipe(prompt=[prompt], config=method, num_inference_steps=steps, guidance_scale=guidance,
               generator=torch.Generator().manual_seed(seed), progress=False)
    image = np.asarray(out.images[0], dtype=np.uint8)
    return (image[:, :, None] if image.ndim == 2 else image), out.trace.to_dict()


def decisions(trace: dict) -> list:
    """What a trace decides, without its timings: per step the stage, d_i and the masked tokens
    (through JSON, as the server sends it: tuples become lists)."""
    import json

    trace = json.loads(json.dumps(trace))
    return [(s["step"], s["stage_kind"], s["d"], s["masked_tokens"], s["bucket_ratio"]) for s in trace["steps"]] + [
        trace["switch_steps"], trace["config"], trace["num_steps"], trace["height"], trace["width"]]


def descendants(pid: int) -> set[int]:
    """Every living process under ``pid`` (from /proc): the server's model instances included."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pids) -> set[int]:
    out = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    out.add(pid)
        except OSError:
            pass
    return out


@pytest.fixture(scope="module")
def server(testbed_engines):
    """``hybridstitch serve`` through its Python API on free loopback ports. A long batching window
    (300 ms) so requests sent together land in one Triton batch."""
    pytest.importorskip("pytriton", reason="serving needs the serve extra (nvidia-pytriton)")
    pytest.importorskip("tritonclient.http", reason="serving needs the serve extra (tritonclient[http])")
    from hybridstitch.serve.server import TritonServer
    from hybridstitch.serve.settings import ModelSettings, ServerSettings

    model = ModelSettings(engines=testbed_engines, threads=1, max_inflight=4, method=METHOD, steps=STEPS,
                          guidance_scale=GUIDANCE)
    settings = ServerSettings(http_port=0, grpc_port=0, metrics_port=0, max_batch_size=4, max_queue_delay_ms=300,
                              startup_timeout_s=180)
    triton = TritonServer(model, settings)
    try:
        triton.start()
        yield triton
    finally:
        pid = triton.pid
        under = descendants(pid) if pid else set()
        triton.stop()
        assert alive(under | ({pid} if pid else set())) == set(), "the server left processes behind"
