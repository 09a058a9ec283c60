"""Stand-ins for TensorRT on CPU: a toolchain that "builds" engines which are the ONNX graphs TensorRT
would parse, and a runtime that runs them with ONNX Runtime through the addresses bound by
``set_tensor_address`` -- so the build driver, the manifest, the refusals and the TensorRT
backend's buffers, bindings and caches run for real here, with TensorRT itself swapped out.

A fake plan is ``MAGIC + <ONNX model bytes>``. For the plugin path the graph TensorRT would
parse has no local function (the plugin stands for the node); the fake puts the function back,
so ONNX Runtime computes what the plugin computes. For the standard path it runs the inlined
graph as is, which checks the inlining itself.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort

from hybridstitch.engine.builds import DeviceInfo, EngineTensor
from hybridstitch.plugins import OP_DOMAIN, OP_NAME
from hybridstitch.plugins.onnx_op import attach_function
from hybridstitch.plugins.tensorrt_plugin import PLUGIN_ID

MAGIC = b"HSFAKEPLAN1\n"
TRT_VERSION = "10.9.0.34"
ADA = DeviceInfo("NVIDIA RTX 6000 Ada Generation", (8, 9), TRT_VERSION)
A100 = DeviceInfo("NVIDIA A100-SXM4-80GB", (8, 0), TRT_VERSION)
H100 = DeviceInfo("NVIDIA H100 80GB HBM3", (9, 0), TRT_VERSION)
ORT_NAMES = {"tensor(float)": "float", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
             "tensor(int64)": "int64", "tensor(int32)": "int32"}
NUMPY = {"float": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


def _session(model_bytes: bytes) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def _io(session) -> list[EngineTensor]:
    out = [EngineTensor(i.name, True, tuple(i.shape), ORT_NAMES[i.type]) for i in session.get_inputs()]
    out += [EngineTensor(o.name, False, tuple(o.shape), ORT_NAMES[o.type]) for o in session.get_outputs()]
    return out


class FakeToolchain:
    """What ``build_engines`` asks of TensorRT, on CPU. Records every build."""

    def __init__(self, device: DeviceInfo = ADA):
        self.device_info = device
        self.built: list[dict] = []
        self.plugin_targets: list[str] = []

    def check_available(self, options) -> None:
        """The fake toolchain is always there (the real one checks TensorRT, its compiler and a GPU)."""

    def device(self) -> DeviceInfo:
        return self.device_info

    def register_plugin(self, target: str) -> dict:
        self.plugin_targets.append(target)
        return dict(id=PLUGIN_ID, implementation="aot", ptx_target=target)

    def engine_from_onnx(self, path, options, timing_cache, plugin: bool) -> bytes:
        model = onnx.load(path)
        ours = [n for n in model.graph.node if n.domain == OP_DOMAIN and n.op_type == OP_NAME]
        self.built.append(dict(file=os.path.basename(path), plugin=plugin, custom_nodes=len(ours),
                               functions=len(model.functions), options=options, timing_cache=timing_cache))
        if ours:
            # what TensorRT's parser would see: no function, nodes tagged for the plugin creator
            assert not model.functions
            for node in ours:
                tags = {a.name: a.s.decode() for a in node.attribute if a.name.startswith("plugin_")}
                assert tags == {"plugin_namespace": "hybridstitch", "plugin_version": "1"}, tags
                kept = [a for a in node.attribute if not a.name.startswith("plugin_")]
                del node.attribute[:]
                node.attribute.extend(kept)
            attach_function(model)  # the plugin computes what the function does
        if timing_cache is not None:
            os.makedirs(os.path.dirname(timing_cache), exist_ok=True)
            with open(timing_cache, "ab"):
                pass
        return MAGIC + model.SerializeToString()

    def engine_from_torch(self, module, example, options, timing_cache) -> bytes:
        raise AssertionError("the CPU tests build through the ONNX path only")

    def engine_io(self, data: bytes) -> list[EngineTensor]:
        # from the graph's declared I/O: ONNX Runtime cannot open bf16 graphs, TensorRT can
        assert data.startswith(MAGIC)
        graph = onnx.load_from_string(data[len(MAGIC):]).graph
        names = {getattr(onnx.TensorProto, k.upper()): v for k, v in
                 (("float", "float"), ("float16", "float16"), ("bfloat16", "bfloat16"), ("int64", "int64"), ("int32", "int32"))}

        def tensor(v, is_input):
            t = v.type.tensor_type
            return EngineTensor(v.name, is_input, tuple(d.dim_value for d in t.shape.dim), names[t.elem_type])

        return [tensor(v, True) for v in graph.input] + [tensor(v, False) for v in graph.output]


class FakeContext:
    """An execution context: binds by address, runs ONNX Runtime on those addresses (CPU memory)."""

    def __init__(self, engine: "FakeEngine"):
        self.engine = engine
        self.addresses: dict[str, int] = {}
        self.executions = 0

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        binding = self.engine.session.io_binding()
        for t in self.engine.tensors:
            args = (t.name, "cpu", 0, NUMPY[t.dtype], list(t.shape), self.addresses[t.name])
            (binding.bind_input if t.is_input else binding.bind_output)(*args)
        self.engine.session.run_with_iobinding(binding)
        self.executions += 1
        return True


class FakeEngine:
    def __init__(self, model_bytes: bytes):
        self.session = _session(model_bytes)
        self.tensors = _io(self.session)
        self.contexts: list[FakeContext] = []

    def create_execution_context(self) -> FakeContext:
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


class FakeRuntime:
    """``TrtRuntime``'s interface: deserialize and describe I/O."""

    def __init__(self, tamper=None):
        self.engines: dict[str, FakeEngine] = {}
        self.tamper = tamper  # optional: (where, [EngineTensor]) -> [EngineTensor], to fake a wrong engine

    def deserialize(self, data: bytes, where: str) -> FakeEngine:
        assert data.startswith(MAGIC), f"{where} is not a fake plan"
        engine = FakeEngine(data[len(MAGIC):])
        if self.tamper is not None:
            engine.tensors = self.tamper(where, engine.tensors)
        self.engines[where] = engine
        return engine

    def io(self, engine: FakeEngine) -> list[EngineTensor]:
        return engine.tensors
