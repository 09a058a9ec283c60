"""The TensorRT plugin: its launch arguments on CPU; the engine itself on a GPU with TensorRT."""

import importlib.util
import math

import pytest
import torch

from hybridstitch.errors import HybridStitchError
from hybridstitch.plugins.cached_kv import OP_DOMAIN, OP_NAME, cached_kv_attention_reference
from hybridstitch.plugins.tensorrt_plugin import PLUGIN_ID, kernel_int_args, register_plugin, target_for_capability
from hybridstitch.plugins.triton_kernel import INT_ARGS

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def test_plugin_id_is_the_onnx_node_identity():
    assert PLUGIN_ID == f"{OP_DOMAIN}::{OP_NAME}" == "hybridstitch::CachedKVAttention"


def test_int_args_are_the_strides_the_torch_launcher_passes():
    # TensorRT tensors are dense: the plugin derives every stride from the shapes. They must
    # be exactly what cached_kv_attention_triton passes for contiguous torch tensors.
    b, h, n, k, t, d = 2, 38, 2304, 231, 333, 64
    q = torch.empty(b, h, k + t, d)  # same layout for key, value and out
    cache = torch.empty(b, h, n, d)
    index = torch.empty(b, k, dtype=torch.int64)
    want = [*q.stride()[:3]] * 3 + [*cache.stride()[:3]] + [*q.stride()[:3]] + [index.stride(0), h, n, k, t]
    got = kernel_int_args(h, k + t, d, n, k)
    assert tuple(got) == INT_ARGS
    assert list(got.values()) == want
    assert max(want) < 2**31, "the extra arguments are int32"


@pytest.mark.parametrize(
    "capability, target", [((8, 0), "sm_80"), ((8, 6), "sm_80"), ((8, 9), "sm_89"), ((9, 0), "sm_90"), ((10, 0), "sm_89"), ((12, 0), "sm_89")]
)
def test_target_for_capability(capability, target):
    assert target_for_capability(*capability) == target


def test_pre_ampere_is_refused():
    with pytest.raises(HybridStitchError, match="8.0"):
        target_for_capability(7, 5)


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the message shown when TensorRT is missing")
def test_register_without_tensorrt_says_how_to_install():
    with pytest.raises(HybridStitchError, match="pip install"):
        register_plugin(target="sm_80")


def _engine_model(b, h, m, n, k, d):
    """A graph of one CachedKVAttention node, fp16, prepared for TensorRT's parser."""
    from onnx import TensorProto, helper

    from hybridstitch.plugins.onnx_for_tensorrt import prepare_for_tensorrt

    f16 = TensorProto.FLOAT16
    inputs = [helper.make_tensor_value_info(x, f16, [b, h, m, d]) for x in ("query", "key", "value")]
    inputs += [helper.make_tensor_value_info(x, f16, [b, h, n, d]) for x in ("cache_k", "cache_v")]
    inputs += [helper.make_tensor_value_info("index", TensorProto.INT64, [b, k])]
    outputs = [helper.make_tensor_value_info("out", f16, [b, h, m, d])]
    outputs += [helper.make_tensor_value_info(x, f16, [b, h, n, d]) for x in ("new_cache_k", "new_cache_v")]
    node = helper.make_node(OP_NAME, [i.name for i in inputs], [o.name for o in outputs], domain=OP_DOMAIN)
    graph = helper.make_graph([node], "one_plugin", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(OP_DOMAIN, 1)])
    return prepare_for_tensorrt(model)


@pytest.mark.gpu
def test_engine_matches_reference():
    trt = pytest.importorskip("tensorrt", reason="TensorRT >= 10.8 is not installed (GPU machines only)")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from hybridstitch.plugins.tensorrt_plugin import enable_aliased_plugin_io

    b, h, n, t, d = 2, 4, 300, 33, 64
    k = math.ceil(0.3 * n)
    register_plugin()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(_engine_model(b, h, k + t, n, k, d).SerializeToString()):
        pytest.fail("ONNX parse failed: " + "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)))
    config = builder.create_builder_config()
    enable_aliased_plugin_io(config)
    serialized = builder.build_serialized_network(network, config)
    assert serialized is not None, "engine build failed (see the TensorRT log above)"
    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    context = engine.create_execution_context()

    g = torch.Generator().manual_seed(0)
    tensors = {x: torch.randn(b, h, k + t, d, generator=g).half().cuda() for x in ("query", "key", "value")}
    tensors.update({x: torch.randn(b, h, n, d, generator=g).half().cuda() for x in ("cache_k", "cache_v")})
    tensors["index"] = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(b)]).cuda()
    ref = cached_kv_attention_reference(*(tensors[x].float() for x in ("query", "key", "value", "cache_k", "cache_v")), tensors["index"])
    inputs = {x: v.clone() for x, v in tensors.items()}
    outputs = {"out": torch.empty(b, h, k + t, d, dtype=torch.half, device="cuda")}
    outputs.update({x: torch.empty(b, h, n, d, dtype=torch.half, device="cuda") for x in ("new_cache_k", "new_cache_v")})
    for name, tensor in {**inputs, **outputs}.items():
        context.set_tensor_address(name, tensor.data_ptr())
    stream = torch.cuda.current_stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()

    assert (outputs["out"].float() - ref[0]).abs().max().item() < 4e-3
    # whether TensorRT wrote the caches into the bound output buffers or aliased them onto the
    # input buffers, the cache outputs read back as the updated caches
    for name, want in (("new_cache_k", ref[1]), ("new_cache_v", ref[2])):
        assert torch.equal(outputs[name].float(), want) or torch.equal(inputs[name.removeprefix("new_")].float(), want)
