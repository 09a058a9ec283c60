"""Preparing an ONNX model with a ``hybridstitch::CachedKVAttention`` node for TensorRT's parser."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from hybridstitch.errors import HybridStitchError
from hybridstitch.plugins.cached_kv import OP_DOMAIN, OP_NAME, OP_VERSION
from hybridstitch.plugins.onnx_for_tensorrt import (
    add_plugin_attributes,
    prepare_file_for_tensorrt,
    prepare_for_tensorrt,
    strip_local_functions,
)

B, H, M, N, K, D = 2, 3, 7, 11, 4, 8  # M = k + T query rows


def _model() -> onnx.ModelProto:
    """One CachedKVAttention node (attribute layer=3) with a local function whose body is a
    trivial standard-op stand-in that calls a helper function; Relu + Add after it, so
    ``out`` is an intermediate with value_info; one more function nobody calls."""
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [helper.make_tensor_value_info(n, f32, [B, H, M, D]) for n in ("query", "key", "value")]
    inputs += [helper.make_tensor_value_info(n, f32, [B, H, N, D]) for n in ("cache_k", "cache_v")]
    inputs += [helper.make_tensor_value_info("index", i64, [B, K])]
    outputs = [helper.make_tensor_value_info("result", f32, [B, H, M, D])]
    outputs += [helper.make_tensor_value_info(n, f32, [B, H, N, D]) for n in ("new_cache_k", "new_cache_v")]
    bias = onnx.numpy_helper.from_array(np.linspace(-1, 1, D, dtype=np.float32), "bias")  # raw_data: can go external
    nodes = [
        helper.make_node(
            OP_NAME, ["query", "key", "value", "cache_k", "cache_v", "index"],
            ["out", "new_cache_k", "new_cache_v"], domain=OP_DOMAIN, name="attn_3", layer=3,
        ),
        helper.make_node("Relu", ["out"], ["relu"]),
        helper.make_node("Add", ["relu", "bias"], ["result"]),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes, "masked", inputs, outputs, initializer=[bias],
        value_info=[helper.make_tensor_value_info("out", f32, [B, H, M, D])],
    )  # fmt: skip
    function = helper.make_function(
        OP_DOMAIN, OP_NAME, ["query", "key", "value", "cache_k", "cache_v", "index"],
        ["out", "new_cache_k", "new_cache_v"],
        [
            helper.make_node("Identity", ["query"], ["out"]),
            helper.make_node("Copy", ["cache_k"], ["new_cache_k"], domain="helpers"),
            helper.make_node("Identity", ["cache_v"], ["new_cache_v"]),
        ],
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("helpers", 1)],
        attributes=["layer"],
    )  # fmt: skip
    copy = helper.make_function(
        "helpers", "Copy", ["x"], ["y"], [helper.make_node("Identity", ["x"], ["y"])],
        opset_imports=[helper.make_opsetid("", 18)],
    )  # fmt: skip
    unused = helper.make_function(
        "other", "Unused", ["x"], ["y"], [helper.make_node("Neg", ["x"], ["y"])],
        opset_imports=[helper.make_opsetid("", 18)],
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(OP_DOMAIN, int(OP_VERSION)), helper.make_opsetid("helpers", 1), helper.make_opsetid("other", 1)]
    model = helper.make_model(graph, opset_imports=opsets, functions=[function, copy, unused], ir_version=10)
    onnx.checker.check_model(model)
    return model


def _node(model):
    return next(n for n in model.graph.node if n.domain == OP_DOMAIN and n.op_type == OP_NAME)


def _attrs(node):
    values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return {name: v.decode() if isinstance(v, bytes) else v for name, v in values.items()}


def test_original_model_runs_in_onnxruntime():
    # sanity of the hand-built model: ONNX Runtime runs the node through its local function
    import onnxruntime as ort

    model = _model()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32) for i in model.graph.input}
    feeds["index"] = np.zeros((B, K), dtype=np.int64)
    result, new_k, _ = session.run(None, feeds)
    np.testing.assert_allclose(result, np.maximum(feeds["query"], 0) + np.linspace(-1, 1, D, dtype=np.float32), rtol=1e-6)
    np.testing.assert_array_equal(new_k, feeds["cache_k"])


def test_strip_removes_our_functions_and_keeps_the_rest():
    model = _model()
    stripped = strip_local_functions(model)
    onnx.checker.check_model(stripped)

    assert [(f.domain, f.name) for f in stripped.functions] == [("other", "Unused")]  # Copy was ours only
    assert _attrs(_node(stripped)) == {"layer": 3}
    assert _node(stripped) == _node(model)
    assert (OP_DOMAIN, int(OP_VERSION)) in [(o.domain, o.version) for o in stripped.opset_import]
    assert stripped.graph.input == model.graph.input
    assert stripped.graph.output == model.graph.output
    assert stripped.graph.value_info == model.graph.value_info
    assert len(model.functions) == 3, "the input model is left as it was"


def test_strip_declares_the_domain_if_only_the_function_did():
    model = _model()
    kept = [o for o in model.opset_import if o.domain != OP_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    stripped = strip_local_functions(model)
    assert (OP_DOMAIN, 1) in [(o.domain, o.version) for o in stripped.opset_import]
    onnx.checker.check_model(stripped)


def test_plugin_attributes_name_the_creator():
    prepared = prepare_for_tensorrt(_model())
    onnx.checker.check_model(prepared)
    assert _attrs(_node(prepared)) == {"layer": 3, "plugin_namespace": OP_DOMAIN, "plugin_version": OP_VERSION, "aot": 1}
    # the parser reads the creator's namespace and version as STRING attributes, and "aot" (the
    # AOT implementation, strictly) as the INT onnx-graphsurgeon writes for True
    assert {a.name: a.type for a in _node(prepared).attribute if a.name != "layer"} == {
        "plugin_namespace": onnx.AttributeProto.STRING,
        "plugin_version": onnx.AttributeProto.STRING,
        "aot": onnx.AttributeProto.INT,
    }
    assert helper.make_attribute("aot", True).type == onnx.AttributeProto.INT
    assert not [f for f in prepared.functions if f.domain == OP_DOMAIN]
    # idempotent: tagging again replaces, never duplicates
    assert add_plugin_attributes(prepared) == 1
    names = [a.name for a in _node(prepared).attribute]
    assert names.count("plugin_namespace") == 1 and names.count("aot") == 1
    add_plugin_attributes(prepared, aot=False)
    assert _attrs(_node(prepared))["aot"] == 0


def test_prepare_file_keeps_external_weights(tmp_path):
    src = tmp_path / "masked.onnx"
    onnx.save(_model(), str(src), save_as_external_data=True, location="masked.onnx.data", size_threshold=0)
    assert (tmp_path / "masked.onnx.data").is_file()
    dst = prepare_file_for_tensorrt(src, tmp_path / "masked.trt.onnx")
    onnx.checker.check_model(str(dst))  # resolves the external data by path
    loaded = onnx.load(str(dst))
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(loaded.graph.initializer[0]), np.linspace(-1, 1, D, dtype=np.float32))
    assert _attrs(_node(loaded))["plugin_namespace"] == OP_DOMAIN
    assert not list(tmp_path.glob("*.tmp"))

    elsewhere = tmp_path / "other" / "masked.trt.onnx"
    with pytest.raises(HybridStitchError, match="same folder"):
        prepare_file_for_tensorrt(src, elsewhere)
    assert not elsewhere.exists()
