"""The real Triton Inference Server (bundled by nvidia-pytriton) serving the testbed's ONNX Runtime
engines on free loopback ports: readiness, images equal to direct calls, Triton's batching, errors
per request, plain KServe v2 JSON, metrics. One server for the module (conftest's ``server``)."""

from __future__ import annotations

import concurrent.futures
import json
import math
import urllib.error
import urllib.request

import numpy as np
import pytest

from hybridstitch import HybridStitchError

from .conftest import GUIDANCE, METHOD, STEPS, decisions, direct_call

pytestmark = pytest.mark.slow


def client(server):
    from hybridstitch.serve.client import HybridStitchClient

    return HybridStitchClient(server.endpoints.http_url, timeout_s=120)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def send_together(server, requests: list[dict]) -> list:
    """All requests at once, one client (connection) each; each result is (image, trace) or the error."""
    def one(kw):
        with client(server) as c:
            try:
                return c.generate(**kw)
            except HybridStitchError as e:
                return e

    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(one, requests))


def batch_counts(server) -> dict[int, int]:
    from hybridstitch.serve.client import batch_sizes

    with client(server) as c:
        return batch_sizes(c.statistics())


def test_ready_with_the_declared_model(server):
    e = server.endpoints
    assert e.host == "127.0.0.1" and len({e.http_port, e.grpc_port, e.metrics_port}) == 3
    with urllib.request.urlopen(f"{e.http_url}/v2/health/ready", timeout=10) as r:
        assert r.status == 200
    config = get_json(f"{e.http_url}/v2/models/hybridstitch/config")
    assert config["backend"] == "python" and config["max_batch_size"] == 4
    assert [(i["name"], i["data_type"], i.get("optional", False)) for i in config["input"]] == [
        ("prompt", "TYPE_STRING", False), ("seed", "TYPE_INT64", False), ("negative_prompt", "TYPE_STRING", True),
        ("steps", "TYPE_INT32", True), ("guidance_scale", "TYPE_FP32", True), ("method", "TYPE_STRING", True)]
    assert [(o["name"], o["data_type"]) for o in config["output"]] == [("image", "TYPE_UINT8"), ("trace", "TYPE_STRING")]


def test_concurrent_requests_equal_direct_calls_and_triton_batches_them(server, direct_pipe):
    before = batch_counts(server)
    wanted = [dict(prompt=f"a handwritten {d}", seed=10 + d, method=m, steps=STEPS, guidance_scale=GUIDANCE)
              for d, m in zip(range(4), [METHOD, "large", METHOD, "testbed-srdiffusion"], strict=True)]
    results = send_together(server, wanted)
    for kw, result in zip(wanted, results, strict=True):
        assert not isinstance(result, Exception), result
        image, trace = result
        want_image, want_trace = direct_call(direct_pipe, kw["prompt"], kw["seed"], kw["method"])
        assert image.dtype == np.uint8 and image.shape == (32, 32, 1)
        np.testing.assert_array_equal(image, want_image)
        assert decisions(trace) == decisions(want_trace)
    assert len({r[0].tobytes() for r in results}) == 4  # four different images, not one repeated
    after = batch_counts(server)
    ran = {size: after.get(size, 0) - before.get(size, 0) for size in after}
    assert sum(size * n for size, n in ran.items()) == 4
    assert max(size for size, n in ran.items() if n) > 1, f"Triton formed no batch larger than 1: {ran}"


def test_a_bad_request_fails_alone(server, direct_pipe):
    good = [dict(prompt="a handwritten 1", seed=5), dict(prompt="a handwritten 8", seed=6)]
    bad = [
        (dict(prompt="a handwritten 2", seed=0, method="hybridstitch-99"), "unknown preset 'hybridstitch-99'"),
        (dict(prompt="a photo of a cat", seed=0), "does not understand 'a photo of a cat'"),  # fails inside the run
        (dict(prompt="a handwritten 2", seed=0, steps=0), "steps must be an integer from 1"),
        (dict(prompt="a handwritten 2", seed=0, guidance_scale=math.nan), "guidance_scale must be a finite number"),
    ]
    results = send_together(server, [good[0], bad[0][0], bad[1][0], good[1], bad[2][0], bad[3][0]])
    for (_, message), result in zip(bad, [results[1], results[2], results[4], results[5]], strict=True):
        assert isinstance(result, HybridStitchError) and message in str(result), result
        assert "refused the request" in str(result)
    for kw, result in zip(good, [results[0], results[3]], strict=True):
        assert not isinstance(result, Exception), result
        np.testing.assert_array_equal(result[0], direct_call(direct_pipe, kw["prompt"], kw["seed"])[0])
    assert client(server).is_ready()  # and the server still serves


def test_plain_kserve_v2_json_takes_the_server_defaults(server, direct_pipe):
    body = {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1, 1], "data": ["a handwritten 4"]},
                       {"name": "seed", "datatype": "INT64", "shape": [1, 1], "data": [21]}]}
    req = urllib.request.Request(f"{server.endpoints.http_url}/v2/models/hybridstitch/infer", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        reply = json.load(r)
    outputs = {o["name"]: o for o in reply["outputs"]}
    assert outputs["image"]["shape"] == [1, 32, 32, 1] and outputs["image"]["datatype"] == "UINT8"
    image = np.array(outputs["image"]["data"], dtype=np.uint8).reshape(32, 32, 1)
    trace = json.loads(outputs["trace"]["data"][0])
    assert trace["config"]["name"] == METHOD and trace["num_steps"] == STEPS  # the server's defaults
    np.testing.assert_array_equal(image, direct_call(direct_pipe, "a handwritten 4", 21)[0])
    body["inputs"].append({"name": "method", "datatype": "BYTES", "shape": [1, 1], "data": ["nope"]})
    req = urllib.request.Request(req.full_url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(req, timeout=60)
    assert caught.value.code == 400 and "unknown preset 'nope'" in json.load(caught.value)["error"]


def scrape(server) -> dict[str, float]:
    """Triton's metrics of the hybridstitch model: name{labels} -> value."""
    with urllib.request.urlopen(server.endpoints.metrics_url, timeout=10) as r:
        text = r.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("nv_inference_") and 'model="hybridstitch"' in line}


def test_prometheus_metrics_count_the_requests_and_batches(server):
    before = scrape(server)
    send_together(server, [dict(prompt="a handwritten 6", seed=0), dict(prompt="a handwritten 6", seed=1)])
    after = scrape(server)

    def grew(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert grew('nv_inference_count{model="hybridstitch",version="1"}') == 2  # requests
    assert 1 <= grew('nv_inference_exec_count{model="hybridstitch",version="1"}') <= 2  # the batches they came in
    assert grew('nv_inference_queue_duration_us{model="hybridstitch",version="1"}') > 0
