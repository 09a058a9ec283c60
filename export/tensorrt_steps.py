"""Build steps of the TensorRT path, small callables named for what they turn into what (as
Polygraphy's loaders), run only when called:

    TensorRTOnnxFromOnnx(src, dst, attention)()             -> the ONNX file TensorRT's parser is given
    ParityFromOnnx(path, module_fn, example, names, prec)()  -> "ONNX Runtime agrees with torch" (or raises)
    EngineBytesFromOnnx(path, options, timing_cache, ...)()  -> a serialized strongly typed engine

TensorRT and Polygraphy are imported lazily: this module imports without them.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from hybridstitch.engine.builds import TensorRTOptions
from hybridstitch.errors import HybridStitchError

# Relative error max|ort - torch| / max|torch| a graph may show before TensorRT is handed it.
PARITY_TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2}


class TensorRTOnnxFromOnnx:
    """An exported ONNX file -> the ONNX file TensorRT's parser is given, next to it (external data
    is referenced by relative path, so it must stay in the same folder). Returns the new path.

    ``plugin``: our local function stripped, nodes tagged ``plugin_namespace``/``plugin_version``;
    ``standard``: the function inlined into standard ops and the custom domain dropped.
    """

    def __init__(self, src: str, dst: str, attention: str):
        self.src, self.dst, self.attention = src, dst, attention

    def __call__(self) -> str:
        import onnx

        if self.attention == "plugin":
            from hybridstitch.plugins.onnx_for_tensorrt import prepare_file_for_tensorrt

            return str(prepare_file_for_tensorrt(self.src, self.dst))
        import onnx.inliner

        from hybridstitch.plugins import OP_DOMAIN

        model = onnx.load(self.src, load_external_data=False)
        inlined = onnx.inliner.inline_local_functions(model)
        kept = [o for o in inlined.opset_import if o.domain != OP_DOMAIN]
        del inlined.opset_import[:]
        inlined.opset_import.extend(kept)
        tmp = self.dst + ".tmp"
        onnx.save(inlined, tmp)
        os.replace(tmp, self.dst)
        return self.dst


class ParityFromOnnx:
    """An exported ONNX file and the torch graph it came from -> the check that they agree.

    ONNX Runtime runs the file on ``example`` inputs (numpy; on a machine with a GPU through the
    CUDA provider, which must be there and must really load: a GPU check never falls back to the
    CPU provider, see ``plugins/ort_providers.py``) and the torch graph runs on the same
    inputs; the relative error ``max|ort - torch| / max|torch|`` of every output must stay under
    the precision's tolerance. Returns a one-line summary; raises HybridStitchError otherwise.
    bf16 graphs (no ONNX Runtime kernels) get the ONNX checker with full shape inference.
    """

    def __init__(self, path: str, module_fn: Callable, example: tuple, output_names: list[str], precision: str):
        self.path, self.module_fn, self.example = path, module_fn, example
        self.output_names, self.precision = output_names, precision

    def __call__(self) -> str:
        if self.precision == "bf16":
            import onnx

            onnx.checker.check_model(self.path, full_check=True)  # by path: graphs over 2 GB
            return "onnx checker with full shape inference (bf16: ONNX Runtime has no bfloat16 kernels)"
        import numpy as np
        import onnxruntime as ort
        import torch

        from hybridstitch.plugins.ort_providers import require_cuda_provider, require_session_on_cuda

        use_cuda = torch.cuda.is_available()
        providers = require_cuda_provider(ort) if use_cuda else ["CPUExecutionProvider"]
        provider = providers[0]
        device = torch.device("cuda" if use_cuda else "cpu")  # the torch side, independently
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(self.path, options, providers=providers)
        if use_cuda:
            require_session_on_cuda(session)
        names = [i.name for i in session.get_inputs()]
        feeds = {n: x.detach().cpu().numpy() for n, x in zip(names, self.example)}
        got = session.run(None, feeds)
        del session
        module = self.module_fn()
        previous = next(module.parameters()).device
        with torch.no_grad():
            module.to(device)
            try:
                want = module(*(x.to(device) for x in self.example))
            finally:
                module.to(previous)
        want = want if isinstance(want, (tuple, list)) else (want,)
        worst, tol = 0.0, PARITY_TOLERANCE[self.precision]
        for name, a, b in zip(self.output_names, got, want):
            b = b.detach().float().cpu().numpy()
            err = float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-12))
            if not err <= tol:
                raise HybridStitchError(
                    f"{os.path.basename(self.path)}: ONNX Runtime's {name!r} differs from the torch graph's by "
                    f"{err:.3g} (relative; tolerance {tol:g} in {self.precision}). The graph is not handed to "
                    "TensorRT. Export in fp32 to tell an exporter bug from fp16 range trouble, or add the overflowing "
                    "blocks to --fp32-blocks"
                )
            worst = max(worst, err)
        return f"onnxruntime ({provider}) vs torch ({device.type}): max relative error {worst:.2e} (tolerance {tol:g})"


def polygraphy_profiles(shapes: list[dict[str, tuple]]) -> list:
    """Polygraphy ``Profile`` objects from ``[{input: (min, opt, max)}]``. Every profile after the first
    asks TensorRT for no extra weight memory (``extra_memory_target = 0``): one engine, one copy
    of the weights, whatever the number of buckets."""
    from polygraphy.backend.trt import Profile

    class SharedWeightsProfile(Profile):
        def to_trt(self, builder, network):
            profile = super().to_trt(builder, network)
            profile.extra_memory_target = 0.0  # ignored by TensorRT for the first profile
            return profile

    out = []
    for shapes_of in shapes:
        profile = SharedWeightsProfile()
        for name, (lo, opt, hi) in shapes_of.items():
            profile.add(name, min=lo, opt=opt, max=hi)
        out.append(profile)
    return out


class EngineBytesFromOnnx:
    """A TensorRT-ready ONNX file -> a serialized, strongly typed engine, through Polygraphy.

    ``NetworkFromOnnxPath(path, strongly_typed=True)`` (types from the graph: no precision
    flags), ``CreateConfig`` with one optimization profile per entry of ``profiles`` (``{input:
    (min, opt, max) shape}``; static per bucket), the timing cache, builder optimisation level and
    hardware compatibility, the aliased-plugin-I/O preview feature when the plugin is in the
    graph, and ``EngineBytesFromNetwork(..., save_timing_cache=...)``.
    """

    def __init__(self, path: str, options: TensorRTOptions, timing_cache: str | None, aliased_plugin_io: bool,
                 profiles: list[dict[str, tuple]] | None = None):
        self.path, self.options = path, options
        self.timing_cache, self.aliased_plugin_io = timing_cache, aliased_plugin_io
        self.profiles = profiles or []

    def loader(self, trt):
        """The Polygraphy loader chain (``trt``: the tensorrt module, for its enums); nothing runs
        until it is called."""
        from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, PostprocessConfig

        network = NetworkFromOnnxPath(self.path, strongly_typed=True)
        kwargs = create_config_kwargs(self.options, trt, self.timing_cache)
        if self.profiles:
            kwargs["profiles"] = polygraphy_profiles(self.profiles)
        config = CreateConfig(**kwargs)
        if self.aliased_plugin_io:
            # PostprocessConfig keeps TensorRT's default preview features (CreateConfig's
            # preview_features would switch off every feature not listed)
            config = PostprocessConfig(config, _enable_aliased_plugin_io)
        return EngineBytesFromNetwork(network, config=config, save_timing_cache=self.timing_cache)

    def __call__(self) -> bytes:
        import tensorrt as trt
        from polygraphy.exception import PolygraphyException

        loader = self.loader(trt)
        try:
            return bytes(loader())
        except PolygraphyException as e:
            raise HybridStitchError(
                f"TensorRT could not build {os.path.basename(self.path)}: {e}. The TensorRT log above names the "
                "layer; --attention standard builds without the plugin, --fp32-blocks keeps overflowing blocks in fp32"
            ) from e


def _enable_aliased_plugin_io(builder, network, config) -> None:
    from hybridstitch.plugins.tensorrt_plugin import enable_aliased_plugin_io

    enable_aliased_plugin_io(config)


def create_config_kwargs(options: TensorRTOptions, trt, timing_cache: str | None) -> dict:
    """Polygraphy ``CreateConfig`` arguments for ``options`` (``trt``: the tensorrt module, for its enums)."""
    kwargs: dict[str, Any] = {}
    if timing_cache is not None:
        kwargs["load_timing_cache"] = timing_cache  # a missing file: Polygraphy starts an empty cache
    if options.builder_optimization_level is not None:
        kwargs["builder_optimization_level"] = options.builder_optimization_level
    if options.hardware_compatibility != "none":
        kwargs["hardware_compatibility_level"] = getattr(
            trt.HardwareCompatibilityLevel, options.hardware_compatibility.upper()
        )
    return kwargs


__all__ = ["EngineBytesFromOnnx", "PARITY_TOLERANCE", "ParityFromOnnx", "TensorRTOnnxFromOnnx", "create_config_kwargs",
           "polygraphy_profiles"]
