"""``hybridstitch-export --backend tensorrt``: options, naming, refusals, graph preparation and the
build driver.

Without TensorRT (this machine) the driver runs with a fake toolchain (``tests/tensorrt_fakes.py``)
whose "engines" are the ONNX graphs TensorRT would have parsed: the ONNX export, the ONNX Runtime
parity check, the plugin / standard preparation, the manifest's ``tensorrt`` section, resuming,
sharing and atomic writes all run for real. Tests marked ``gpu`` build real engines with
TensorRT (and Torch-TensorRT) and skip without them.
"""

import os
import shutil
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from hybridstitch import HybridStitchError
from hybridstitch.denoiser import TransformerSpec
from hybridstitch.engine.torch_backend import TorchDenoiser
from hybridstitch.engine.builds import (
    DeviceInfo,
    EngineTensor,
    TensorRTOptions,
    build_id,
    check_engine_file,
    ptx_target,
    select_build,
    timing_cache_path,
    why_build_cannot_run,
)
from hybridstitch.export import ExportRequest, export_engines, read_manifest
from hybridstitch.export.cli import main as cli_main
from hybridstitch.export.graphs import FullGraph, GraphShapes, example_inputs
from hybridstitch.export.onnx_steps import resolve_fp32_blocks
from hybridstitch.export.tensorrt_build import match_engine_io
from hybridstitch.export.tensorrt_steps import ParityFromOnnx, TensorRTOnnxFromOnnx, create_config_kwargs
from hybridstitch.export.torch_tensorrt_build import compile_settings
from hybridstitch.loading import load_transformer
from hybridstitch.plugins import OP_DOMAIN, OP_NAME
from tests.tensorrt_fakes import A100, ADA, H100, TRT_VERSION, FakeToolchain

ADA_TARGET = "sm89-nvidia-rtx-6000-ada-generation"
H200 = DeviceInfo("NVIDIA H200", (9, 0), TRT_VERSION)

BASE = dict(height=64, width=64, batch=2, buckets=(0.3,), text_tokens=7)


def snapshot(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            st = os.stat(p)
            out[os.path.relpath(p, folder)] = (st.st_size, st.st_mtime_ns)
    return out


def export_trt(tiny_dirs, out, toolchain, **kw):
    """A TensorRT export on this machine: the fake toolchain stands for TensorRT."""
    req = ExportRequest(large=tiny_dirs[0], small=tiny_dirs[1], backend="tensorrt", **{**BASE, **kw})
    return export_engines(req, str(out), progress=False, toolchain=toolchain)


@pytest.fixture(scope="module")
def fp16_export(tiny_dirs, tmp_path_factory):
    """fp16 graphs with block 1 of the large model kept in float32, plugin engines for an RTX 6000 Ada."""
    out = tmp_path_factory.mktemp("trt") / "fp16"
    toolchain = FakeToolchain(ADA)
    manifest = export_trt(tiny_dirs, out, toolchain, precision="fp16", fp32_blocks=(1,),
                          tensorrt=TensorRTOptions(builder_optimization_level=4))
    return str(out), manifest, toolchain


# -- options, names, refusals (pure) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(compiler="tvm"), "compiler must be one of onnx, torch-tensorrt"),
        (dict(attention="flash"), "attention must be one of plugin, standard"),
        (dict(hardware_compatibility="all"), "hardware_compatibility"),
        (dict(builder_optimization_level=6), "0..5"),
        (dict(verify="tensorrt"), "verify"),
        (dict(compiler="torch-tensorrt", attention="standard"), "use --compiler onnx"),
        (dict(compiler="torch-tensorrt", hardware_compatibility="same_compute_capability"), "Ampere-plus"),
    ],
)
def test_bad_options_say_what_to_choose(kw, match):
    with pytest.raises(HybridStitchError, match=match):
        TensorRTOptions(**kw)


def test_engines_are_named_per_gpu_model_and_tensorrt_version():
    assert build_id(ADA, TensorRTOptions()) == f"{ADA_TARGET}/trt{TRT_VERSION}/onnx-plugin"
    assert build_id(ADA, TensorRTOptions(attention="standard")) == f"{ADA_TARGET}/trt{TRT_VERSION}/onnx-standard"
    # GPUs of one compute capability do not share engines or timing caches
    assert build_id(H100, TensorRTOptions()) == f"sm90-nvidia-h100-80gb-hbm3/trt{TRT_VERSION}/onnx-plugin"
    assert build_id(H200, TensorRTOptions()) == f"sm90-nvidia-h200/trt{TRT_VERSION}/onnx-plugin"
    assert timing_cache_path(H100) != timing_cache_path(H200)
    assert timing_cache_path(H200) == f"tensorrt/timing/sm90-nvidia-h200/trt{TRT_VERSION}/timing.cache"
    assert build_id(A100, TensorRTOptions(hardware_compatibility="same_compute_capability")).startswith("sm80-samecc/")
    assert build_id(H100, TensorRTOptions(compiler="torch-tensorrt", hardware_compatibility="ampere_plus")) == (
        f"ampere_plus/trt{TRT_VERSION}/torch-tensorrt-plugin")
    assert [ptx_target(d, "none") for d in (A100, ADA, H100)] == ["sm_80", "sm_89", "sm_90"]
    assert ptx_target(H100, "ampere_plus") == "sm_80"  # runs on every GPU the engine runs on


def _build(**kw):
    build = dict(tensorrt_version=TRT_VERSION, compute_capability=[8, 9], gpu="NVIDIA RTX 6000 Ada Generation",
                 hardware_compatibility="none",
                 plugin=dict(id="hybridstitch::CachedKVAttention", implementation="aot", ptx_target="sm_89",
                             ptx_version="8.0"),
                 complete=True, compiler="onnx", attention="plugin")
    build.update(kw)
    return build


BLACKWELL = DeviceInfo("NVIDIA RTX PRO 6000 Blackwell", (12, 0), TRT_VERSION)
TURING = DeviceInfo("Tesla T4", (7, 5), TRT_VERSION)


@pytest.mark.parametrize(
    "build,device,match",
    [
        (_build(), ADA, None),
        # another Ada of the same compute capability: engines are tied to the GPU model that built them
        (_build(), DeviceInfo("NVIDIA L40S", (8, 9), TRT_VERSION), "tied to the GPU model"),
        (_build(hardware_compatibility="same_compute_capability"), DeviceInfo("NVIDIA L40S", (8, 9), TRT_VERSION), None),
        (_build(), A100, "compute capability 8.0"),
        (_build(), DeviceInfo(ADA.name, (8, 9), "10.8.0.43"), "TensorRT 10.8.0.43"),
        (_build(hardware_compatibility="same_compute_capability"), H100, "same compute capability"),
        (_build(hardware_compatibility="ampere_plus", compute_capability=[9, 0],
                plugin=dict(id="p", ptx_target="sm_80")), A100, None),
        (_build(hardware_compatibility="ampere_plus", plugin=dict(id="p", ptx_target="sm_80")), BLACKWELL, None),
        (_build(hardware_compatibility="ampere_plus", plugin=dict(id="p", ptx_target="sm_80")), TURING, "Ampere or newer"),
        (_build(hardware_compatibility="ampere_plus", plugin=dict(id="p", ptx_target="sm_89")), A100, "sm_89 PTX"),
        (_build(hardware_compatibility="ampere_plus", plugin=dict(id="p", ptx_target="sm_90")), BLACKWELL, "sm_90 PTX"),
        (_build(plugin=None, hardware_compatibility="ampere_plus"), TURING, "Ampere"),
        (_build(complete=False), ADA, "did not finish"),
        # the plugin's PTX is JIT-compiled by the driver at load: an ISA it does not know is refused
        (_build(), DeviceInfo(ADA.name, (8, 9), TRT_VERSION, driver_cuda=(13, 0)), None),
        (_build(plugin=dict(id="p", implementation="aot", ptx_target="sm_89", ptx_version="9.4")),
         DeviceInfo(ADA.name, (8, 9), TRT_VERSION, driver_cuda=(13, 0)), "loads PTX up to 9.0"),
        (_build(plugin=dict(id="p", implementation="aot", ptx_target="sm_89")), ADA, "PTX ISA version is not recorded"),
    ],
)
def test_why_a_build_cannot_run(build, device, match):
    why = why_build_cannot_run(build, device)
    assert why is None if match is None else match in why


def _manifest(builds):
    return SimpleNamespace(
        tensorrt={"builds": builds}, resolution=dict(height=768, width=768), batch=2, tokens=dict(text=333),
        bucket_ratios=lambda: [0.1, 0.3], precision="fp16", opset=18,
        models={"large": {"path": "/m/sd35-large"}, "small": {"path": "/m/sd3-medium"}},
    )


def test_select_build_prefers_the_onnx_plugin_build_and_refuses_with_the_command():
    builds = {
        "ampere_plus/x/onnx-plugin": _build(hardware_compatibility="ampere_plus", plugin=dict(id="p", ptx_target="sm_80")),
        "sm89/x/torch-tensorrt-plugin": _build(compiler="torch-tensorrt"),
        "sm89/x/onnx-standard": _build(attention="standard", plugin=None),
        "sm89/x/onnx-plugin": _build(),
        "sm80/x/onnx-plugin": _build(compute_capability=[8, 0], gpu=A100.name, plugin=dict(id="p", ptx_target="sm_80")),
    }
    assert select_build(_manifest(builds), ADA, "/e")[0] == "sm89/x/onnx-plugin"
    assert select_build(_manifest(builds), ADA, "/e", attention="standard")[0] == "sm89/x/onnx-standard"
    assert select_build(_manifest(builds), ADA, "/e", compiler="torch-tensorrt")[0] == "sm89/x/torch-tensorrt-plugin"
    assert select_build(_manifest(builds), A100, "/e")[0] == "sm80/x/onnx-plugin"
    assert select_build(_manifest(builds), BLACKWELL, "/e")[0] == "ampere_plus/x/onnx-plugin"
    with pytest.raises(HybridStitchError) as e:
        select_build(_manifest(builds), TURING, "/srv/engines")
    message = str(e.value)
    assert "Tesla T4 (compute capability 7.5)" in message and "sm89/x/onnx-plugin: built on" in message
    assert ("hybridstitch-export --backend tensorrt --large /m/sd35-large --small /m/sd3-medium --height 768 "
            "--width 768 --batch 2 --text-tokens 333 --buckets 0.1 0.3 --precision fp16 --opset 18 "
            "--out /srv/engines") in message
    with pytest.raises(HybridStitchError, match="holds no TensorRT engines"):
        select_build(_manifest({}), ADA, "/e")


def test_builder_config_from_options():
    trt = SimpleNamespace(HardwareCompatibilityLevel=SimpleNamespace(AMPERE_PLUS="AMPERE_PLUS",
                                                                     SAME_COMPUTE_CAPABILITY="SAME_CC"))
    assert create_config_kwargs(TensorRTOptions(), trt, None) == {}
    got = create_config_kwargs(TensorRTOptions(builder_optimization_level=5, hardware_compatibility="ampere_plus"), trt,
                               "/c/timing.cache")
    assert got == dict(load_timing_cache="/c/timing.cache", builder_optimization_level=5,
                       hardware_compatibility_level="AMPERE_PLUS")
    got = create_config_kwargs(TensorRTOptions(hardware_compatibility="same_compute_capability"), trt, None)
    assert got == dict(hardware_compatibility_level="SAME_CC")
    # no precision flags: strongly typed networks take their types from the graph
    settings = compile_settings(TensorRTOptions(compiler="torch-tensorrt", builder_optimization_level=2,
                                                hardware_compatibility="ampere_plus"), "/c/t.cache")
    assert settings["use_explicit_typing"] and settings["require_full_compilation"]
    assert settings["optimization_level"] == 2 and settings["hardware_compatible"] and settings["timing_cache_path"] == "/c/t.cache"


def test_polygraphy_loader_chain():
    """The ONNX path's build composes Polygraphy's loaders (constructing them needs no TensorRT)."""
    pytest.importorskip("polygraphy", reason="Polygraphy is not installed (pip install polygraphy)")
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, PostprocessConfig

    from hybridstitch.export.tensorrt_steps import EngineBytesFromOnnx, _enable_aliased_plugin_io

    trt = SimpleNamespace(HardwareCompatibilityLevel=SimpleNamespace(AMPERE_PLUS="AMPERE_PLUS"))
    opts = TensorRTOptions(builder_optimization_level=5, hardware_compatibility="ampere_plus")
    loader = EngineBytesFromOnnx("/e/.tmp-hybridstitch-export-trt-large.plugin.onnx", opts, "/e/timing.cache", aliased_plugin_io=True).loader(trt)
    assert isinstance(loader, EngineBytesFromNetwork) and loader.timing_cache_path == "/e/timing.cache"
    network = loader._network
    assert isinstance(network, NetworkFromOnnxPath) and network.strongly_typed
    assert network.path == "/e/.tmp-hybridstitch-export-trt-large.plugin.onnx"
    assert isinstance(loader._config, PostprocessConfig) and loader._config._func is _enable_aliased_plugin_io
    config = loader._config._config
    assert isinstance(config, CreateConfig) and not config.fp16 and not config.bf16  # types come from the graph
    assert config.builder_optimization_level == 5 and config.hardware_compatibility_level == "AMPERE_PLUS"
    assert config.timing_cache_path == "/e/timing.cache"
    plain = EngineBytesFromOnnx("/e/small.onnx", TensorRTOptions(), None, aliased_plugin_io=False).loader(trt)
    assert isinstance(plain._config, CreateConfig) and plain.timing_cache_path is None


def test_engine_io_is_matched_to_the_graph():
    entry = SimpleNamespace(
        inputs=[SimpleNamespace(name="latents", shape=[2, 16, 8, 8], dtype="float16"),
                SimpleNamespace(name="timestep", shape=[2], dtype="float")],
        outputs=[SimpleNamespace(name="velocity", shape=[2, 16, 8, 8], dtype="float16")],
    )
    same = [EngineTensor("latents", True, (2, 16, 8, 8), "float16"), EngineTensor("timestep", True, (2,), "float"),
            EngineTensor("velocity", False, (2, 16, 8, 8), "float16")]
    assert match_engine_io(entry, same, by_position=False) == {"latents": "latents", "timestep": "timestep",
                                                                "velocity": "velocity"}
    renamed = [EngineTensor("x", True, (2, 16, 8, 8), "float16"), EngineTensor("t", True, (2,), "float"),
               EngineTensor("output0", False, (2, 16, 8, 8), "float16")]
    assert match_engine_io(entry, renamed, by_position=True) == {"latents": "x", "timestep": "t", "velocity": "output0"}
    with pytest.raises(HybridStitchError, match="no input 'latents'"):
        match_engine_io(entry, renamed, by_position=False)
    wrong = [same[0], EngineTensor("timestep", True, (2,), "float16"), same[2]]
    with pytest.raises(HybridStitchError, match="input 'timestep' .* float16 .* graph's is float"):
        match_engine_io(entry, wrong, by_position=False)


def test_fp32_blocks_resolution():
    sd35_large = TransformerSpec(16, 16, 2, 38, 38, 64, 4096, 2048, 192, (), "rms_norm")
    sd3_medium = TransformerSpec(16, 16, 2, 24, 24, 64, 4096, 2048, 192, (), None)
    assert resolve_fp32_blocks(None, "fp16", sd35_large) == [35]  # TensorRT's SD3.5 Large demo
    assert resolve_fp32_blocks(None, "bf16", sd35_large) == []
    assert resolve_fp32_blocks(None, "fp16", sd3_medium) == []
    assert resolve_fp32_blocks((3, 5), "fp16", sd3_medium) == [3, 5]
    assert resolve_fp32_blocks((3,), "fp32", sd3_medium) == []
    with pytest.raises(HybridStitchError, match="has 24 blocks"):
        resolve_fp32_blocks((30,), "fp16", sd3_medium)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(precision="bf16"), "bf16 graphs are for --backend tensorrt only"),
        (dict(precision="bf16", backend="tensorrt"), "bf16 needs opset >= 22"),
        (dict(tensorrt=TensorRTOptions()), "apply to --backend tensorrt only"),
        (dict(fp32_blocks=(-1,)), "block indices >= 0"),
        (dict(precision="fp16", fp32_blocks=(7,)), "do not exist"),
    ],
)
def test_bad_requests_write_nothing(tiny_dirs, tmp_path, change, match):
    out = tmp_path / "eng"
    with pytest.raises(HybridStitchError, match=match):
        export_engines(ExportRequest(large=tiny_dirs[0], small=tiny_dirs[1], **{**BASE, **change}), str(out),
                       progress=False, toolchain=FakeToolchain())
    assert not out.exists()


def test_cli_tensorrt_flags(tiny_dirs, tmp_path, capsys):
    args = ["--large", tiny_dirs[0], "--small", tiny_dirs[1], "--height", "64", "--width", "64", "--text-tokens", "7",
            "--out", str(tmp_path / "eng"), "--quiet"]
    assert cli_main([*args, "--attention", "standard", "--builder-optimization-level", "3"]) == 2
    assert "--attention, --builder-optimization-level apply to --backend tensorrt only" in capsys.readouterr().err
    assert cli_main([*args, "--precision", "bf16"]) == 2
    assert "bf16 graphs are for --backend tensorrt only" in capsys.readouterr().err
    assert cli_main([*args, "--fp32-blocks", "two"]) == 2
    assert "--fp32-blocks takes auto, none or block indices" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli_main([*args, "--backend", "tensorrt", "--precision", "fp16"]) == 2
        assert "tensorrt" in capsys.readouterr().err.lower()
    assert not (tmp_path / "eng").exists()


# -- graph preparation ---------------------------------------------------------------------------------------


def test_prepared_graphs_for_the_plugin_and_for_standard_attention(tiny_engines, tmp_path):
    folder, _ = tiny_engines
    shutil.copytree(folder, tmp_path / "eng")  # prepared graphs live beside the weights (external data)
    tmp_path = tmp_path / "eng"
    src = str(tmp_path / "large.onnx")
    plugin = onnx.load(TensorRTOnnxFromOnnx(src, str(tmp_path / "p.onnx"), "plugin")())
    ours = [n for n in plugin.graph.node if (n.domain, n.op_type) == (OP_DOMAIN, OP_NAME)]
    assert len(ours) == 4 and not plugin.functions  # one per slot; the parser reaches the plugin
    assert all({a.name: a.s for a in n.attribute if a.name.startswith("plugin_")} ==
               {"plugin_namespace": b"hybridstitch", "plugin_version": b"1"} for n in ours)

    standard_path = TensorRTOnnxFromOnnx(src, str(tmp_path / "s.onnx"), "standard")()
    standard = onnx.load(standard_path)
    assert not standard.functions and OP_DOMAIN not in {o.domain for o in standard.opset_import}
    assert not [n for n in standard.graph.node if n.domain == OP_DOMAIN]
    ops = {n.op_type for n in standard.graph.node}
    assert {"ScatterND", "Concat", "Softmax", "MatMul"} <= ops
    onnx.checker.check_model(standard, full_check=True)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    a = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(standard_path, so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {}
    for i in a.get_inputs():
        shape = [{"batch": 2, "k": 5}.get(d, d) for d in i.shape]
        feeds[i.name] = (np.stack([np.sort(rng.permutation(16)[:5]) for _ in range(2)]) if i.name == "index"
                         else rng.standard_normal(shape).astype(np.float32))
    for x, y in zip(a.run(None, feeds), b.run(None, feeds)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_parity_check_catches_a_graph_that_disagrees(tiny_engines, tiny_dirs):
    folder, _ = tiny_engines
    small = TorchDenoiser(load_transformer(tiny_dirs[1], "small"), "small")
    example = example_inputs("small", small.spec, GraphShapes(2, 8, 8, 7), torch.float32)
    check = ParityFromOnnx(os.path.join(folder, "small.onnx"), lambda: FullGraph(small), example, ["velocity"], "fp32")
    assert "onnxruntime (CPUExecutionProvider) vs torch" in check()
    with torch.no_grad():
        small.model.proj_out.weight.mul_(1.5)  # the torch model moved on: the graph no longer matches it
    with pytest.raises(HybridStitchError, match="'velocity' differs from the torch graph's .* not handed to TensorRT"):
        check()


# -- the build driver, with the fake toolchain ---------------------------------------------------------------


def test_tensorrt_export_writes_engines_and_manifest(fp16_export):
    out, manifest, toolchain = fp16_export
    assert manifest.backend["name"] == "tensorrt" and manifest.precision == "fp16" and manifest.fp32_blocks == [1]
    m = read_manifest(out)
    assert m.to_dict() == manifest.to_dict() and m.complete
    bid = f"{ADA_TARGET}/trt{TRT_VERSION}/onnx-plugin"
    assert list(m.tensorrt["builds"]) == [bid]
    build = m.tensorrt["builds"][bid]
    assert build["complete"] and build["dir"] == f"tensorrt/{bid}" and build["gpu"] == ADA.name
    assert build["compute_capability"] == [8, 9] and build["tensorrt_version"] == TRT_VERSION
    assert build["builder_optimization_level"] == 4 and build["hardware_compatibility"] == "none"
    assert build["strongly_typed"] and build["precision"] == "fp16" and build["fp32_blocks"] == [1]
    assert build["plugin"] == {"id": "hybridstitch::CachedKVAttention", "implementation": "aot", "ptx_target": "sm_89",
                               "ptx_version": "8.0"}
    assert build["python_plugins"] == [] and build["timing_cache"] == timing_cache_path(ADA)
    assert sorted(build["engines"]) == ["large", "small"]  # one large engine: one copy of the weights
    for name, record in build["engines"].items():
        assert record["file"] == f"tensorrt/{bid}/{name}.plan" and check_engine_file(out, record) is None
        assert record["io_names"] == {t.name: t.name for t in [*m.graphs[name].inputs, *m.graphs[name].outputs]}
        assert m.tensorrt["verified"][name]["result"].startswith("onnxruntime (CPUExecutionProvider) vs torch")
    assert toolchain.plugin_targets == ["sm_89"]
    built = {b["file"]: b for b in toolchain.built}
    assert sorted(built) == [".tmp-hybridstitch-export-trt-large.plugin.onnx", ".tmp-hybridstitch-export-trt-small.plugin.onnx"]
    assert built[".tmp-hybridstitch-export-trt-large.plugin.onnx"]["plugin"] and built[".tmp-hybridstitch-export-trt-large.plugin.onnx"]["custom_nodes"] == 4
    assert not built[".tmp-hybridstitch-export-trt-small.plugin.onnx"]["plugin"]  # no attention node: no aliased-I/O preview feature
    # a static profile per batch (1, 2: up to the export's) and bucket (k = ceil(0.3 * 16) = 5), and k = N = 16
    # for the full step
    assert build["engines"]["large"]["profiles"] == [{"batch": b, "k": k} for b in (1, 2) for k in (5, 16)]
    assert build["engines"]["small"]["profiles"] == [{"batch": 1}, {"batch": 2}]
    index_shapes = [p["index"] for p in built[".tmp-hybridstitch-export-trt-large.plugin.onnx"]["profiles"]]
    assert index_shapes == [([b, k], [b, k], [b, k]) for b in (1, 2) for k in (5, 16)]
    assert all(b["timing_cache"] == os.path.join(out, build["timing_cache"]) for b in built.values())
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]  # prepared graphs removed


def test_fp32_block_is_float32_inside_the_fp16_graph(fp16_export):
    out, _, _ = fp16_export
    model = onnx.load(os.path.join(out, "large.onnx"))
    types = {i.name: i.data_type for i in model.graph.initializer}
    block1 = {t for n, t in types.items() if "transformer_blocks.1." in n}
    block0 = {t for n, t in types.items() if "transformer_blocks.0." in n}
    assert block1 == {onnx.TensorProto.FLOAT} and block0 == {onnx.TensorProto.FLOAT16}
    assert all(i.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.INT64, onnx.TensorProto.FLOAT)
               for i in model.graph.input)
    caches = [o for o in model.graph.output if "cache" in o.name]
    assert caches and all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for o in caches)


def test_rerun_builds_nothing(fp16_export, tiny_dirs, tmp_path):
    out, _, _ = fp16_export
    work = tmp_path / "eng"
    shutil.copytree(out, work)
    before = snapshot(work)
    toolchain = FakeToolchain(ADA)
    export_trt(tiny_dirs, work, toolchain, precision="fp16", fp32_blocks=(1,),
               tensorrt=TensorRTOptions(builder_optimization_level=4))
    assert toolchain.built == [] and snapshot(work) == before


def test_standard_attention_builds_beside_and_shares_the_full_engines(fp16_export, tiny_dirs, tmp_path):
    out, _, _ = fp16_export
    work = tmp_path / "eng"
    shutil.copytree(out, work)
    toolchain = FakeToolchain(ADA)
    m = export_trt(tiny_dirs, work, toolchain, precision="fp16", fp32_blocks=(1,),
                   tensorrt=TensorRTOptions(builder_optimization_level=4, attention="standard"))
    assert [(b["file"], b["plugin"], b["custom_nodes"], b["functions"]) for b in toolchain.built] == [
        (".tmp-hybridstitch-export-trt-large.standard.onnx", False, 0, 0)]  # inlined; the small engine is shared
    builds = m.tensorrt["builds"]
    bids = [f"{ADA_TARGET}/trt{TRT_VERSION}/onnx-plugin", f"{ADA_TARGET}/trt{TRT_VERSION}/onnx-standard"]
    assert sorted(builds) == bids
    plugin, standard = builds[bids[0]], builds[bids[1]]
    assert standard["plugin"] is None and toolchain.plugin_targets == []
    assert standard["engines"]["small"]["sha256"] == plugin["engines"]["small"]["sha256"]
    assert os.path.samefile(work / plugin["engines"]["small"]["file"], work / standard["engines"]["small"]["file"])
    assert standard["engines"]["large"]["key"] != plugin["engines"]["large"]["key"]


def test_another_gpu_gets_its_own_build_and_a_damaged_engine_is_rebuilt_alone(fp16_export, tiny_dirs, tmp_path):
    out, _, _ = fp16_export
    work = tmp_path / "eng"
    shutil.copytree(out, work)
    a100 = FakeToolchain(A100)
    m = export_trt(tiny_dirs, work, a100, precision="fp16", fp32_blocks=(1,),
                   tensorrt=TensorRTOptions(builder_optimization_level=4))
    a100_bid = f"sm80-nvidia-a100-sxm4-80gb/trt{TRT_VERSION}/onnx-plugin"
    ada_bid = f"{ADA_TARGET}/trt{TRT_VERSION}/onnx-plugin"
    assert len(a100.built) == 2 and a100.plugin_targets == ["sm_80"]
    assert sorted(m.tensorrt["builds"]) == [a100_bid, ada_bid]
    assert os.path.isfile(work / timing_cache_path(A100))
    record = m.tensorrt["builds"][ada_bid]["engines"]["large"]
    with open(work / record["file"], "ab") as f:
        f.write(b"junk")
    ada = FakeToolchain(ADA)
    export_trt(tiny_dirs, work, ada, precision="fp16", fp32_blocks=(1,), tensorrt=TensorRTOptions(builder_optimization_level=4))
    assert [b["file"] for b in ada.built] == [".tmp-hybridstitch-export-trt-large.plugin.onnx"]
    assert check_engine_file(str(work), read_manifest(str(work)).tensorrt["builds"][ada_bid]["engines"]["large"]) is None


def test_changed_builder_options_rebuild(fp16_export, tiny_dirs, tmp_path):
    out, _, _ = fp16_export
    work = tmp_path / "eng"
    shutil.copytree(out, work)
    toolchain = FakeToolchain(ADA)
    export_trt(tiny_dirs, work, toolchain, precision="fp16", fp32_blocks=(1,), tensorrt=TensorRTOptions(builder_optimization_level=5))
    assert len(toolchain.built) == 2
    build = read_manifest(str(work)).tensorrt["builds"][f"{ADA_TARGET}/trt{TRT_VERSION}/onnx-plugin"]
    assert build["builder_optimization_level"] == 5


@pytest.mark.slow
def test_bf16_graphs_for_tensorrt(tiny_dirs, tmp_path):
    """bf16 (opset 22): ONNX Runtime cannot run it, so the ONNX checker with shape inference verifies it."""
    toolchain = FakeToolchain(H100)
    m = export_trt(tiny_dirs, tmp_path / "bf16", toolchain, precision="bf16", opset=22,
                   tensorrt=TensorRTOptions(verify="onnxruntime"))
    assert {t.dtype for t in m.graphs["large"].inputs} == {"bfloat16", "float", "int64"}  # timestep stays float32
    for name in ("small", "large"):
        assert m.tensorrt["verified"][name]["result"].startswith("onnx checker with full shape inference (bf16")
    build = m.tensorrt["builds"][f"sm90-nvidia-h100-80gb-hbm3/trt{TRT_VERSION}/onnx-plugin"]
    assert build["precision"] == "bf16" and build["plugin"]["ptx_target"] == "sm_90"


# -- on a GPU with TensorRT -------------------------------------------------------------------------------------


def _need(module: str, why: str):
    pytest.importorskip(module, reason=why)
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["plugin", "standard"])
def test_real_build_on_gpu(tiny_dirs, tmp_path, attention):
    _need("tensorrt", "TensorRT 10.9-11.x is not installed (GPU machines only: pip install hybridstitch[gpu])")
    pytest.importorskip("polygraphy", reason="Polygraphy is not installed (pip install polygraphy)")
    out = tmp_path / "trt"
    m = export_engines(ExportRequest(large=tiny_dirs[0], small=tiny_dirs[1], backend="tensorrt", precision="fp16",
                                     tensorrt=TensorRTOptions(attention=attention), **BASE), str(out), progress=False)
    (bid, build), = m.tensorrt["builds"].items()
    assert bid.endswith(f"onnx-{attention}") and build["complete"]
    for record in build["engines"].values():
        assert check_engine_file(str(out), record) is None


@pytest.mark.gpu
def test_torch_tensorrt_build_on_gpu(tiny_dirs, tmp_path):
    _need("torch_tensorrt", "Torch-TensorRT is not installed (GPU machines only: pip install torch-tensorrt)")
    from hybridstitch.engine.tensorrt_backend import load_engines

    out = tmp_path / "ttrt"
    m = export_engines(ExportRequest(large=tiny_dirs[0], small=tiny_dirs[1], backend="tensorrt", precision="fp16",
                                     tensorrt=TensorRTOptions(compiler="torch-tensorrt"), **BASE), str(out), progress=False)
    (bid, build), = m.tensorrt["builds"].items()
    assert bid.endswith("torch-tensorrt-plugin") and build["python_plugins"] == ["hybridstitch::cached_kv_attention"]
    es = load_engines(str(out), compiler="torch-tensorrt")
    assert es.build_id == bid and not es.large.graph.cuda_graphs  # JIT plugin: no CUDA graphs
    large = TorchDenoiser(load_transformer(tiny_dirs[0], "large").cuda(), "large")
    g = torch.Generator().manual_seed(0)
    x, pe, pooled = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 7, 32, generator=g), torch.randn(2, 16, generator=g)
    x, pe, pooled, t = x.cuda(), pe.cuda(), pooled.cuda(), torch.full((2,), 500.0, device="cuda")
    cache, ref = es.large.new_cache(2, 8, 8), large.new_cache(2, 8, 8)
    want = large.forward(x, pe, pooled, t, cache=ref)
    assert (es.large.forward(x, pe, pooled, t, cache=cache) - want).abs().max() <= 2e-2 * want.abs().max()
    idx = torch.tensor([[0, 3, 5, 9, 12], [1, 2, 8, 10, 15]], device="cuda")
    want = large.forward_masked(x, pe, pooled, t, idx, ref)
    assert (es.large.forward_masked(x, pe, pooled, t, idx, cache) - want).abs().max() <= 2e-2 * want.abs().max()
