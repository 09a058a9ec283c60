"""The model's tensors, the request decoding, the settings and the generated model repository (no server)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from hybridstitch import HybridStitchError
from hybridstitch.serve.protocol import INPUTS, OUTPUTS, input_arrays, request_from_inputs
from hybridstitch.serve.repository import config_pbtxt, instance_groups, write_repository
from hybridstitch.serve.runner import GenerationRequest
from hybridstitch.serve.settings import ModelSettings, ServerSettings

DEFAULTS = {"method": "testbed-30", "steps": 12, "guidance_scale": 1.25}


def test_inputs_round_trip_and_omitted_ones_take_the_defaults():
    full = input_arrays("a handwritten 3", 7, negative_prompt="", steps=5, guidance_scale=2.0, method="large")
    assert {name: (a.shape, a.dtype) for name, a in full.items()} == {
        "prompt": ((1, 1), object), "seed": ((1, 1), np.int64), "negative_prompt": ((1, 1), object),
        "steps": ((1, 1), np.int32), "guidance_scale": ((1, 1), np.float32), "method": ((1, 1), object)}
    assert request_from_inputs(full.get, DEFAULTS) == GenerationRequest(
        prompt="a handwritten 3", seed=7, negative_prompt="", steps=5, guidance_scale=2.0, method="large")
    minimal = input_arrays("a handwritten 3", 7)
    assert set(minimal) == {"prompt", "seed"}
    assert request_from_inputs(minimal.get, DEFAULTS) == GenerationRequest(prompt="a handwritten 3", seed=7, **DEFAULTS)


def test_one_image_per_request_and_text_must_be_utf8():
    two = {"prompt": np.array([[b"a"], [b"b"]], dtype=object), "seed": np.array([[0], [1]])}
    with pytest.raises(HybridStitchError, match=r"input 'prompt' has shape \[2, 1\]: send one image per request"):
        request_from_inputs(two.get, DEFAULTS)
    bad = {"prompt": np.array([[b"\xff\xfe"]], dtype=object), "seed": np.array([[0]])}
    with pytest.raises(HybridStitchError, match="input 'prompt' must be UTF-8 text"):
        request_from_inputs(bad.get, DEFAULTS)
    nan = {**input_arrays("3", 0), "guidance_scale": np.array([[np.nan]], dtype=np.float32)}
    with pytest.raises(HybridStitchError, match="guidance_scale must be a finite number"):
        request_from_inputs(nan.get, DEFAULTS)


def test_model_settings_refuse_what_cannot_be_served(tmp_path):
    with pytest.raises(HybridStitchError, match="not both"):
        ModelSettings(engines=str(tmp_path), large=str(tmp_path), small=str(tmp_path))
    with pytest.raises(HybridStitchError, match="exported engines .* or a checkpoint pair"):
        ModelSettings()
    with pytest.raises(HybridStitchError, match="needs both --large DIR and --small DIR"):
        ModelSettings(large=str(tmp_path))
    with pytest.raises(HybridStitchError, match="--engines '/no/such' is not a folder; export engines with hybridstitch-export"):
        ModelSettings(engines="/no/such")
    with pytest.raises(HybridStitchError, match="unknown preset 'nope'"):
        ModelSettings(engines=str(tmp_path), method="nope")
    with pytest.raises(HybridStitchError, match="steps must be an integer from 1"):
        ModelSettings(engines=str(tmp_path), steps=0)
    settings = ModelSettings(engines=".", threads=2)
    assert ModelSettings.from_json(settings.to_json()) == settings
    assert settings.with_absolute_paths().engines == os.path.abspath(".")


@pytest.mark.parametrize("changes,message", [
    (dict(http_port=70000), "--http-port must be a port from 0"),
    (dict(grpc_port=-1), "--grpc-port must be a port from 0"),
    (dict(http_port=9000, metrics_port=9000), "ports must differ"),
    (dict(max_batch_size=0), "--max-batch-size must be a positive integer"),
    (dict(max_queue_delay_ms=float("nan")), "--max-queue-delay-ms must be a finite number"),
    (dict(instances=0), "--instances must be a positive integer"),
    (dict(host=""), "--host must be an address"),
])
def test_server_settings_refuse_bad_values(changes, message):
    with pytest.raises(HybridStitchError, match=message):
        ServerSettings(**changes)


def test_the_repository_declares_the_tensors_batching_and_instances(tmp_path):
    model = ModelSettings(large=str(tmp_path), small=str(tmp_path))
    cpu = instance_groups(model, instances=2, gpu_count=0)
    text = config_pbtxt(ServerSettings(max_batch_size=8, max_queue_delay_ms=2.5, max_queue_size=32), cpu)
    assert 'name: "hybridstitch"' in text and 'backend: "python"' in text and "max_batch_size: 8" in text
    assert "max_queue_delay_microseconds: 2500" in text and "max_queue_size: 32" in text
    assert "{ count: 2 kind: KIND_CPU }" in text
    for spec in INPUTS + OUTPUTS:
        assert f'name: "{spec.name}" data_type: {spec.config_type}' in text
    assert text.count("optional: true") == sum(s.optional for s in INPUTS) == 4
    # The torch pair on a 2-GPU machine: one group per GPU, each pinned to its device.
    gpus = instance_groups(model, instances=3, gpu_count=2)
    assert [g.to_pbtxt() for g in gpus] == ["{ count: 3 kind: KIND_GPU gpus: [ 0 ] }", "{ count: 3 kind: KIND_GPU gpus: [ 1 ] }"]
    repo = write_repository(str(tmp_path / "ws"), model, ServerSettings(), cpu)
    with open(os.path.join(repo, "hybridstitch", "settings.json"), encoding="utf-8") as f:
        assert json.load(f)["large"] == os.path.abspath(str(tmp_path))
    with open(os.path.join(repo, "hybridstitch", "1", "model.py"), encoding="utf-8") as f:
        assert "from hybridstitch.serve.model import TritonPythonModel" in f.read()


def test_onnxruntime_engines_take_cpu_instances_even_with_gpus(testbed_engines):
    groups = instance_groups(ModelSettings(engines=testbed_engines), instances=2, gpu_count=4)
    assert [g.to_pbtxt() for g in groups] == ["{ count: 2 kind: KIND_CPU }"]


def test_serving_never_imports_the_builder():
    """A server loads no export code (DESIGN.md section 4): the serve package's imports, lazy ones included."""
    from tests.test_architecture import IMPORTS, within

    bad = sorted(f"{s} imports {d}" for s, targets in IMPORTS.items() if within(s, ("hybridstitch.serve",))
                 for d in targets if within(d, ("hybridstitch.export",)))
    assert bad == []
    assert any(within(s, ("hybridstitch.serve",)) for s in IMPORTS)
