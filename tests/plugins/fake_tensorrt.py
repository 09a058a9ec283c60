"""A stand-in for the ``tensorrt`` and ``tensorrt.plugin`` modules, for :func:`register_plugin` on CPU.

It keeps what the plugin registers (descriptor, autotune, AOT implementation) so a test can call
them the way TensorRT would at build time: with tensor descriptors whose shapes are symbolic
expressions. The expressions here carry plain ints and support only what TensorRT's
``ShapeExpr`` supports and the plugin claims to use (``*`` and ``-``), so a change to the
plugin that reaches for another operator fails here too.
"""

from __future__ import annotations

import types


class ShapeExpr:
    """TensorRT's symbolic shape expression, holding a known int."""

    def __init__(self, value: int, constant: bool = True):
        self.value = int(value)
        self.is_constant = constant

    def constant_value(self) -> int:
        assert self.is_constant, "constant_value() of a non-constant shape expression"
        return self.value

    def _other(self, other) -> int:
        if isinstance(other, ShapeExpr):
            return other.value
        if isinstance(other, int):
            return other
        return NotImplemented

    def __mul__(self, other):
        return ShapeExpr(self.value * self._other(other), self.is_constant)

    __rmul__ = __mul__

    def __sub__(self, other):
        return ShapeExpr(self.value - self._other(other), self.is_constant)


class TensorDesc:
    def __init__(self, shape, dtype):
        self.shape_expr = [ShapeExpr(x) for x in shape]
        self.dtype = dtype

    def like(self):
        return ("like", self)

    def aliased(self):
        return ("aliased", self)


class SymInt32:
    def __init__(self, value):
        self.value = value.value if isinstance(value, (ShapeExpr, SymInt32)) else int(value)


class KernelLaunchParams:
    FIELDS = ("grid_x", "grid_y", "grid_z", "block_x", "block_y", "block_z", "shared_mem")

    def __init__(self):
        for name in self.FIELDS:
            object.__setattr__(self, name, SymInt32(0 if name == "shared_mem" else 1))

    def __setattr__(self, name, value):  # TensorRT wraps every field in a SymInt32 and knows no others
        if name not in self.FIELDS:
            raise AttributeError(f"KernelLaunchParams object has no attribute '{name}'")
        object.__setattr__(self, name, SymInt32(value))

    def values(self) -> dict:
        return {name: getattr(self, name).value for name in self.FIELDS}


class SymExprs(list):
    pass


class SymIntExprs(SymExprs):
    def __init__(self, size: int):
        super().__init__([None] * size)


class AutoTuneCombination:
    def __init__(self, io_types: str, io_formats: str):
        self.io_types, self.io_formats = io_types, io_formats


def make_modules(version: str):
    """(tensorrt, tensorrt.plugin) fakes claiming TensorRT ``version``; ``plugin.registered`` records."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.float16, trt.bfloat16, trt.float32, trt.int64 = "FP16", "BF16", "FP32", "INT64"
    trt.PreviewFeature = types.SimpleNamespace(ALIASED_PLUGIN_IO_10_03="ALIASED_PLUGIN_IO_10_03")

    plugin = types.ModuleType("tensorrt.plugin")
    plugin.registered = {}

    def decorator(kind):
        def make(plugin_id):
            def record(fn):
                plugin.registered[(kind, plugin_id)] = fn
                return fn

            return record

        return make

    plugin.register, plugin.autotune, plugin.aot_impl = decorator("register"), decorator("autotune"), decorator("aot_impl")
    for cls in (TensorDesc, SymInt32, KernelLaunchParams, SymExprs, SymIntExprs, AutoTuneCombination):
        setattr(plugin, cls.__name__, cls)
    trt.plugin = plugin
    return trt, plugin


class FakeBuilderConfig:
    def __init__(self):
        self.preview = {}

    def set_preview_feature(self, feature, on: bool) -> None:
        self.preview[feature] = on
