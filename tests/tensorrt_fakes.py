"""Stand-ins for TensorRT on CPU: a toolchain that "builds" engines which are the ONNX graphs TensorRT
would parse, and a runtime that runs them with ONNX Runtime through the addresses bound by
``set_tensor_address`` -- so the build driver, the manifest, the refusals and the TensorRT
backend's buffers, bindings and caches run for real here, with TensorRT itself swapped out.

A fake plan is ``MAGIC + <JSON line: the optimization profiles> + <ONNX model bytes>``. For the plugin path the graph TensorRT would
parse has no local function (the plugin stands for the node); the fake puts the function back,
so ONNX Runtime computes what the plugin computes. For the standard path it runs the inlined
graph as is, which checks the inlining itself.
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort

from hybridstitch.engine.builds import DeviceInfo, EngineTensor
from hybridstitch.plugins import OP_DOMAIN, OP_NAME
from hybridstitch.plugins.onnx_op import attach_function
from hybridstitch.plugins.tensorrt_plugin import plugin_record

MAGIC = b"HSFAKEPLAN2\n"
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


def _dims(shape) -> tuple:
    """ONNX Runtime's shape (symbol names for dynamic dimensions) as TensorRT reports it (-1)."""
    return tuple(d if isinstance(d, int) else -1 for d in shape)


def _io(session) -> list[EngineTensor]:
    out = [EngineTensor(i.name, True, _dims(i.shape), ORT_NAMES[i.type]) for i in session.get_inputs()]
    out += [EngineTensor(o.name, False, _dims(o.shape), ORT_NAMES[o.type]) for o in session.get_outputs()]
    return out


def _split(plan: bytes) -> tuple[list, bytes]:
    assert plan.startswith(MAGIC), "not a fake plan"
    header, _, model = plan[len(MAGIC):].partition(b"\n")
    return json.loads(header), model


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
        return plugin_record(target)

    def engine_from_onnx(self, path, options, timing_cache, plugin: bool, profiles) -> bytes:
        model = onnx.load(path)
        ours = [n for n in model.graph.node if n.domain == OP_DOMAIN and n.op_type == OP_NAME]
        self.built.append(dict(file=os.path.basename(path), plugin=plugin, custom_nodes=len(ours),
                               functions=len(model.functions), options=options, timing_cache=timing_cache,
                               profiles=profiles))
        inputs = {i.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in i.type.tensor_type.shape.dim]
                  for i in model.graph.input}
        for profile in profiles:  # every profile is static (min = opt = max) and names real inputs
            for name, (lo, opt, hi) in profile.items():
                assert lo == opt == hi and len(lo) == len(inputs[name]), (name, lo, opt, hi)
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
        return MAGIC + json.dumps([{n: list(v[0]) for n, v in p.items()} for p in profiles]).encode() + b"\n" \
            + model.SerializeToString()

    def engine_from_torch(self, module, example, options, timing_cache) -> bytes:
        raise AssertionError("the CPU tests build through the ONNX path only")

    def engine_io(self, data: bytes) -> list[EngineTensor]:
        # from the graph's declared I/O: ONNX Runtime cannot open bf16 graphs, TensorRT can
        _, model = _split(data)
        graph = onnx.load_from_string(model).graph
        names = {getattr(onnx.TensorProto, k.upper()): v for k, v in
                 (("float", "float"), ("float16", "float16"), ("bfloat16", "bfloat16"), ("int64", "int64"), ("int32", "int32"))}

        def tensor(v, is_input):
            t = v.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
            return EngineTensor(v.name, is_input, dims, names[t.elem_type])

        return [tensor(v, True) for v in graph.input] + [tensor(v, False) for v in graph.output]


class FakeContext:
    """An execution context: a profile, input shapes and addresses set one by one, then ONNX
    Runtime runs on those addresses (CPU memory), outputs at the shapes the inputs imply."""

    def __init__(self, engine: "FakeEngine", user_managed: bool):
        self.engine = engine
        self.user_managed = user_managed
        self.profile = 0
        self.device_memory: tuple[int, int] | None = None
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.executions = 0

    def set_optimization_profile_async(self, index: int, stream_handle: int) -> bool:
        self.profile = index
        return 0 <= index < self.engine.num_optimization_profiles

    def set_device_memory(self, address: int, size: int) -> None:
        assert address % 256 == 0 and size >= self.engine.get_device_memory_size_for_profile_v2(self.profile)
        self.device_memory = (address, size)

    def set_input_shape(self, name: str, shape) -> bool:
        want = self.engine.profiles[self.profile].get(name)
        if want is not None and list(shape) != list(want):
            return False  # outside this (static) profile
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        assert self.device_memory is not None, "a user-managed context runs only with its device memory set"
        symbols = {}
        for i in self.engine.session.get_inputs():
            for d, v in zip(i.shape, self.shapes[i.name]):
                if isinstance(d, str):
                    symbols[d] = v
        binding = self.engine.session.io_binding()
        for t, o in zip(self.engine.tensors, [*self.engine.session.get_inputs(), *self.engine.session.get_outputs()]):
            shape = self.shapes[t.name] if t.is_input else [symbols[d] if isinstance(d, str) else d for d in o.shape]
            args = (t.name, "cpu", 0, NUMPY[t.dtype], list(shape), self.addresses[t.name])
            (binding.bind_input if t.is_input else binding.bind_output)(*args)
        self.engine.session.run_with_iobinding(binding)
        self.executions += 1
        return True


class FakeEngine:
    def __init__(self, plan: bytes):
        self.profiles, model = _split(plan)
        self.session = _session(model)
        self.tensors = _io(self.session)
        self.contexts: list[FakeContext] = []

    @property
    def num_optimization_profiles(self) -> int:
        return max(1, len(self.profiles))

    def get_device_memory_size_for_profile_v2(self, index: int) -> int:
        return 1024 * (index + 1)  # a made-up activation size per profile

    def create_execution_context(self, user_managed: bool = False) -> FakeContext:
        self.contexts.append(FakeContext(self, user_managed))
        return self.contexts[-1]


class FakeRuntime:
    """``TrtRuntime``'s interface: deserialize, describe I/O and profiles, make contexts."""

    def __init__(self, tamper=None):
        self.engines: dict[str, FakeEngine] = {}
        self.tamper = tamper  # optional: (where, [EngineTensor]) -> [EngineTensor], to fake a wrong engine

    def deserialize(self, data: bytes, where: str) -> FakeEngine:
        engine = FakeEngine(data)
        if self.tamper is not None:
            engine.tensors = self.tamper(where, engine.tensors)
        self.engines[where] = engine
        return engine

    def io(self, engine: FakeEngine) -> list[EngineTensor]:
        return engine.tensors

    def num_profiles(self, engine: FakeEngine) -> int:
        return engine.num_optimization_profiles

    def profile_memory(self, engine: FakeEngine, profile: int) -> int:
        return engine.get_device_memory_size_for_profile_v2(profile)

    def context(self, engine: FakeEngine, profile: int, stream_handle: int) -> FakeContext:
        context = engine.create_execution_context(user_managed=True)
        assert context.set_optimization_profile_async(profile, stream_handle)
        return context
