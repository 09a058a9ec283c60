"""The TensorRT plugin: its launch, versions and registration on CPU (TensorRT faked); the engine on a GPU."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybridstitch.errors import HybridStitchError
from hybridstitch.plugins import tensorrt_plugin
from hybridstitch.plugins.aot import AOT_SPLITS, PTX_VERSION, AotKernel, ptx_isa_version, why_ptx_cannot_load
from hybridstitch.plugins.cached_kv import OP_DOMAIN, OP_NAME, cached_kv_attention_reference
from hybridstitch.plugins.tensorrt_plugin import (
    PLUGIN_ID,
    aot_launch,
    kernel_int_args,
    plugin_record,
    register_plugin,
    target_for_capability,
    tensorrt_kernel_arguments,
    why_tensorrt_unsupported,
)
from hybridstitch.plugins.triton_kernel import INPUT_POINTERS, INT_ARGS, OUTPUT_POINTERS
from tests.plugins import fake_tensorrt

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed (pip install triton)"
)
REPO = Path(__file__).resolve().parents[2]


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
    with pytest.raises(HybridStitchError, match="pip install 'tensorrt>=10.9,<12'"):
        register_plugin(target="sm_80")


@pytest.mark.parametrize(
    "version, refused",
    [("10.8.0.43", "aot_impl arrived in 10.9"), ("10.3.0", "aot_impl arrived in 10.9"), ("10.9.0.34", None),
     ("10.16.1.11", None), ("11.0.0.114", None), ("11.4.0.106", None), ("12.0.0", "not reviewed"),
     ("", "cannot read"), ("banana", "cannot read")],
)  # fmt: skip
def test_tensorrt_version_range(version, refused):
    reason = why_tensorrt_unsupported(version)
    if refused is None:
        assert reason is None
    else:
        assert refused in reason and "tensorrt>=10.9,<12" in reason


def test_plugin_record_names_the_ptx_the_load_check_reads():
    record = plugin_record("sm_90")
    assert record == {"id": PLUGIN_ID, "implementation": "aot", "ptx_target": "sm_90",
                      "ptx_version": f"{PTX_VERSION // 10}.{PTX_VERSION % 10}"}  # fmt: skip
    assert why_ptx_cannot_load(record["ptx_version"], (13, 0)) is None
    assert why_ptx_cannot_load(plugin_record("sm_90", ptx_version=94)["ptx_version"], (13, 0)) is not None
    with pytest.raises(HybridStitchError, match="sm_80"):
        plugin_record("sm_75")


def _kernel(**overrides) -> AotKernel:
    fields = dict(target="sm_90", dtype="fp16", head_dim=64, kernel_name="cached_kv_attention_kernel", ptx=".version 8.0",
                  cubin=None, num_warps=4, num_stages=2, shared_mem=49152, block_m=128, block_n=64,
                  arg_names=INPUT_POINTERS + INT_ARGS + OUTPUT_POINTERS)  # fmt: skip
    return AotKernel(**{**fields, **overrides})


def test_aot_launch_is_the_documented_grid():
    b, h, n, k, t, d = 2, 38, 4096, 1639, 333, 64
    launch = aot_launch(_kernel(), b, h, k + t, d, n, k)
    assert launch.grid == (b * h, AOT_SPLITS, 1)
    assert launch.block == (128, 1, 1) and launch.shared_mem == 49152
    assert launch.int_args == tuple(kernel_int_args(h, k + t, d, n, k).values())
    assert aot_launch(_kernel(num_warps=8), b, h, k + t, d, n, k, splits=3).grid == (b * h, 3, 1)
    assert aot_launch(_kernel(num_warps=8), b, h, k + t, d, n, k).block == (256, 1, 1)


def test_tensorrt_argument_order():
    launch = aot_launch(_kernel(), 1, 2, 7, 64, 20, 3)
    ins, outs = ["q", "k", "v", "ck", "cv", "idx"], ["o", "ck", "cv"]  # cache outputs alias the inputs
    args = tensorrt_kernel_arguments(ins, launch, outs)
    assert args == [*ins, *launch.int_args, *outs]
    assert len(args) == len(_kernel().arg_names)  # one argument per PTX parameter
    with pytest.raises(HybridStitchError, match="6 inputs and 3 outputs"):
        tensorrt_kernel_arguments(ins[:5], launch, outs)


@pytest.fixture
def fake_trt(monkeypatch):
    """Install a fake ``tensorrt`` of a given version; returns (trt, trt.plugin)."""

    def install(version):
        trt, plugin = fake_tensorrt.make_modules(version)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setitem(sys.modules, "tensorrt.plugin", plugin)
        monkeypatch.setattr(tensorrt_plugin, "_REGISTERED", {})  # TensorRT's registry is per process
        return trt, plugin

    return install


@needs_triton
@pytest.mark.parametrize("version", ["10.9.0.34", "11.0.0.114"])
def test_registration_under_tensorrt_10_and_11(fake_trt, version):
    # what TensorRT does at build time with the registered plugin, on one SD3.5-Large-sized layer
    trt, plugin = fake_trt(version)
    assert register_plugin(target="sm_90") == PLUGIN_ID
    assert register_plugin(target="sm_90") == PLUGIN_ID, "registering twice is a no-op"
    assert set(plugin.registered) == {(kind, PLUGIN_ID) for kind in ("register", "autotune", "aot_impl")}

    b, h, n, k, t, d = 2, 38, 2304, 692, 333, 64
    desc = fake_tensorrt.TensorDesc
    q, key, v = (desc([b, h, k + t, d], trt.float16) for _ in range(3))
    ck, cv = desc([b, h, n, d], trt.float16), desc([b, h, n, d], trt.float16)
    idx = desc([b, k], trt.int64)
    out, new_k, new_v = plugin.registered[("register", PLUGIN_ID)](q, key, v, ck, cv, idx)
    assert out == ("like", q) and new_k == ("aliased", ck) and new_v == ("aliased", cv), "the caches are updated in place"

    name, ptx, params, extra = plugin.registered[("aot_impl", PLUGIN_ID)](q, key, v, ck, cv, idx, (), 0)
    assert ".entry " + name + "(" in ptx and ptx_isa_version(ptx) == (PTX_VERSION // 10, PTX_VERSION % 10)
    kernel = tensorrt_plugin._compiled("sm_90", "fp16", d)
    want = aot_launch(kernel, b, h, k + t, d, n, k)
    assert params.values() == dict(zip(fake_tensorrt.KernelLaunchParams.FIELDS, (*want.grid, *want.block, want.shared_mem)))
    assert [arg.value for arg in extra] == list(kernel_int_args(h, k + t, d, n, k).values())

    config = fake_tensorrt.FakeBuilderConfig()
    tensorrt_plugin.enable_aliased_plugin_io(config)
    assert config.preview == {"ALIASED_PLUGIN_IO_10_03": True}


@pytest.mark.parametrize("version", ["10.8.0.43", "12.1.0"])
def test_registration_refuses_unsupported_tensorrt(fake_trt, version):
    _, plugin = fake_trt(version)
    with pytest.raises(HybridStitchError, match="tensorrt>=10.9,<12"):
        register_plugin(target="sm_90")
    assert not plugin.registered


_ABI_RUNNER = r"""
import json, sys
import torch
torch.set_num_threads(1)
from hybridstitch.plugins.aot import read_kernel
from hybridstitch.plugins.cached_kv import cached_kv_attention_reference
from hybridstitch.plugins.tensorrt_plugin import aot_launch, tensorrt_kernel_arguments
from hybridstitch.plugins.triton_kernel import get_kernel, interpreter_problem

if interpreter_problem():
    print("SKIP " + interpreter_problem()); sys.exit(0)
results = {}
for path in sys.argv[1:]:
    kernel = read_kernel(path)
    dtype = {"fp16": torch.float16, "fp32": torch.float32}[kernel.dtype]
    b, h, n, k, t, d = 2, 2, 45, 11, 13, kernel.head_dim
    g = torch.Generator().manual_seed(0)
    q, key, v = (torch.randn(b, h, k + t, d, generator=g).to(dtype) for _ in range(3))
    ck, cv = (torch.randn(b, h, n, d, generator=g).to(dtype) for _ in range(2))
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(b)])
    ref = cached_kv_attention_reference(q.float(), key.float(), v.float(), ck.float(), cv.float(), idx)
    out = torch.empty_like(q)
    launch = aot_launch(kernel, b, h, k + t, d, n, k)
    # TensorRT's order, with the cache outputs aliased to the cache inputs; the interpreter binds
    # the arguments to the kernel's parameters by position, as the driver binds PTX parameters
    args = tensorrt_kernel_arguments([q, key, v, ck, cv, idx], launch, [out, ck, cv])
    get_kernel()[launch.grid[:2]](*args, **kernel.constexprs())
    results[kernel.dtype] = {"err": (out.float() - ref[0]).abs().max().item(),
                             "caches": torch.equal(ck.float(), ref[1]) and torch.equal(cv.float(), ref[2])}
print("RESULTS" + json.dumps(results))
"""


@needs_triton
def test_the_tensorrt_launch_computes_the_op(tmp_path):
    # the plugin's launch ABI on CPU: the AOT kernels' grid, int32 arguments and argument order,
    # run by Triton's interpreter (benchmarks/gpu_suite.py's part "aot" does it with the driver)
    from hybridstitch.plugins.aot import compile_for_target, write_kernel

    paths = [write_kernel(compile_for_target("sm_80", dtype=dt, head_dim=16, assemble_cubin=False), tmp_path)[1]
             for dt in ("fp16", "fp32")]  # fmt: skip
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _ABI_RUNNER, *map(str, paths)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    if proc.stdout.startswith("SKIP"):
        pytest.skip(proc.stdout.strip().removeprefix("SKIP "))
    results = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULTS"))[7:])
    assert results["fp32"]["err"] < 1e-5 and results["fp16"]["err"] < 2e-3
    assert results["fp32"]["caches"] and results["fp16"]["caches"]


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
def test_engine_matches_reference(tmp_path):
    trt = pytest.importorskip("tensorrt", reason="TensorRT >= 10.9 is not installed (GPU machines only)")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import onnx

    from hybridstitch.export.tensorrt_build import EngineBytesFromOnnx, TensorRTOptions

    b, h, n, t, d = 2, 4, 300, 33, 64
    k = math.ceil(0.3 * n)
    register_plugin()
    # the production build: Polygraphy's strongly typed network from the file, aliased plugin I/O
    path = tmp_path / "one_plugin.onnx"
    onnx.save(_engine_model(b, h, k + t, n, k, d), str(path))
    serialized = EngineBytesFromOnnx(str(path), TensorRTOptions(), timing_cache=None, aliased_plugin_io=True)()
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    assert engine is not None, "TensorRT could not deserialize the engine it built (see its log above)"
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
