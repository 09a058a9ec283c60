"""What ``hybridstitch-export`` is asked to build: :class:`ExportRequest`, checked at the edge, and
what a checkpoint folder says about itself (VAE scale, text tokens, scheduler).

Pure checks: nothing here loads a model or writes a file.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from hybridstitch.engine.builds import TensorRTOptions
from hybridstitch.engine.manifest import PRECISIONS
from hybridstitch.errors import HybridStitchError
from hybridstitch.loading import read_json

BACKENDS = ("onnxruntime", "tensorrt")
DEFAULT_BUCKETS = (0.1, 0.2, 0.3, 0.4)
DEFAULT_OPSET = 18
# The dynamo exporter's lowest opset: asked for less, it silently writes 18.
MIN_OPSET = 18
# Conv, LayerNorm and friends take bfloat16 only from opset 22 on.
BF16_MIN_OPSET = 22
# SD3's text conditioning: 77 CLIP tokens + 256 T5 tokens (diffusers' max_sequence_length).
SD3_TEXT_TOKENS = 77 + 256

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ONNX_FLOAT = {"fp32": "float", "fp16": "float16", "bf16": "bfloat16"}


# -- the request -------------------------------------------------------------------------------------


@dataclass
class ExportRequest:
    """What ``hybridstitch-export`` builds. Height and width are in pixels; batch counts CFG."""

    large: str
    small: str
    height: int
    width: int
    batch: int = 2
    buckets: tuple[float, ...] = DEFAULT_BUCKETS
    precision: str = "fp32"
    backend: str = "onnxruntime"
    opset: int = DEFAULT_OPSET
    text_tokens: int | None = None  # None: from the large folder's conditioner (SD3: 333)
    vae_scale_factor: int | None = None  # None: from the large folder (SD3: 8; testbed: 1)
    overwrite: bool = False
    # Large-model blocks run in float32 inside a fp16 graph (casts at the block's edges). None:
    # automatic -- block 35 of SD3.5 Large in fp16, as TensorRT's own SD3.5 demo; () for none.
    fp32_blocks: tuple[int, ...] | None = None
    tensorrt: TensorRTOptions | None = None  # backend="tensorrt" only; None: the defaults
    # Refuse (before writing anything) when the memory plan does not fit this many GB; ``encoders``:
    # where the text encoders and VAE will run, for that plan (gpu | cpu | none).
    gpu_memory_gb: float | None = None
    encoders: str = "gpu"

    def __post_init__(self) -> None:
        self.buckets = tuple(sorted({float(r) for r in self.buckets}))
        if self.backend not in BACKENDS:
            raise HybridStitchError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.precision not in PRECISIONS:
            raise HybridStitchError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.batch, int) or self.batch < 1:
            raise HybridStitchError(
                f"batch must be a positive integer (it counts the CFG doubling: 1 image with guidance is 2), got {self.batch!r}"
            )
        if self.height <= 0 or self.width <= 0:
            raise HybridStitchError(f"height and width must be positive, got {self.height}x{self.width}")
        for r in self.buckets:
            if not 0.0 < r <= 1.0:
                raise HybridStitchError(f"bucket ratios must be in (0, 1], got {r} in {list(self.buckets)}")
        if len({round(r, 6) for r in self.buckets}) != len(self.buckets):
            raise HybridStitchError(f"bucket ratios {list(self.buckets)} are too close to tell apart (6 digits)")
        check_opset(self.opset)
        if self.text_tokens is not None and self.text_tokens < 1:
            raise HybridStitchError(f"text_tokens must be >= 1, got {self.text_tokens}")
        if self.precision == "bf16":
            if self.backend != "tensorrt":
                raise HybridStitchError(
                    "bf16 graphs are for --backend tensorrt only: ONNX Runtime's CPU provider has no bfloat16 kernels. "
                    "Export fp16 or fp32 for onnxruntime"
                )
            if self.opset < BF16_MIN_OPSET:
                raise HybridStitchError(
                    f"bf16 needs opset >= {BF16_MIN_OPSET} (Conv and LayerNormalization take bfloat16 from opset 22); "
                    f"got {self.opset}: pass --opset {BF16_MIN_OPSET}"
                )
        if self.encoders not in ("gpu", "cpu", "none"):
            raise HybridStitchError(f"encoders must be gpu, cpu or none, got {self.encoders!r}")
        if self.gpu_memory_gb is not None and not (isinstance(self.gpu_memory_gb, (int, float))
                                                   and 0 < self.gpu_memory_gb < float("inf")):
            raise HybridStitchError(f"gpu_memory_gb must be a positive number of GB, got {self.gpu_memory_gb!r}")
        if self.fp32_blocks is not None:
            self.fp32_blocks = tuple(sorted({int(i) for i in self.fp32_blocks}))
            if any(i < 0 for i in self.fp32_blocks):
                raise HybridStitchError(f"fp32_blocks are block indices >= 0, got {list(self.fp32_blocks)}")
        if self.backend == "tensorrt":
            self.tensorrt = self.tensorrt or TensorRTOptions()
            if self.tensorrt.compiler == "torch-tensorrt":
                from .torch_tensorrt_build import check_torch_tensorrt_precision

                check_torch_tensorrt_precision(self.precision)
        elif self.tensorrt is not None:
            raise HybridStitchError(
                "TensorRT options (compiler, attention, builder optimisation level, hardware compatibility, timing "
                "cache, verify) apply to --backend tensorrt only"
            )


def _exporter_max_opset() -> int:
    """The newest opset torch.onnx converts its graphs to (its own constant; 23 in torch 2.13).
    Above it the exporter logs a failed conversion and writes its native opset instead."""
    try:
        from torch.onnx import _constants

        return int(_constants.ONNX_MAX_OPSET)
    except (ImportError, AttributeError, TypeError, ValueError):
        return 23


def _onnxruntime_runs_opset(opset: int) -> bool:
    """Whether this ONNX Runtime loads a model of ``opset`` (a one-node model, in memory)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "opset_probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=min(10, onnx.IR_VERSION))
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:  # onnxruntime raises its own exception types
        return False
    return True


@functools.lru_cache(maxsize=None)
def max_opset() -> tuple[int, str]:
    """The newest opset an export can write AND ONNX Runtime can run (every export is checked
    with it), and what sets that limit."""
    import onnx
    import onnxruntime

    limit = min(_exporter_max_opset(), onnx.defs.onnx_opset_version())
    why = f"torch {torch.__version__}'s ONNX exporter converts up to opset {_exporter_max_opset()}"
    while limit > MIN_OPSET and not _onnxruntime_runs_opset(limit):
        limit -= 1
        why = f"onnxruntime {onnxruntime.__version__} runs up to opset {limit}"
    return limit, why


def check_opset(opset) -> int:
    """``opset`` is one the exporter writes and ONNX Runtime runs: [18, :func:`max_opset`]."""
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise HybridStitchError(f"opset must be a whole number, got {opset!r}")
    if opset < MIN_OPSET:
        raise HybridStitchError(f"opset must be >= {MIN_OPSET} (the dynamo exporter's lowest), got {opset}")
    top, why = max_opset()
    if opset > top:
        raise HybridStitchError(
            f"opset {opset} is beyond what this export can write: {why}. Choose --opset {MIN_OPSET}..{top}"
        )
    return opset


def vae_scale_factor_of(folder: str) -> int:
    """Pixels per latent cell of the large folder's VAE: SD3's 8, the testbed's 1, 8 without a VAE."""
    index_path = os.path.join(folder, "model_index.json")
    if os.path.isfile(index_path) and "prompt_encoder" in read_json(index_path):
        return 1  # the testbed's identity VAE
    vae_cfg = os.path.join(folder, "vae", "config.json")
    if os.path.isfile(vae_cfg):
        return 2 ** (len(read_json(vae_cfg).get("block_out_channels", [0, 0, 0, 0])) - 1)
    return 8


def text_tokens_of(folder: str) -> int:
    """Text tokens of the large folder's conditioner: the testbed encoder's ``num_tokens``, else SD3's 333."""
    cfg = os.path.join(folder, "prompt_encoder", "config.json")
    if os.path.isfile(cfg):
        return int(read_json(cfg).get("num_tokens", 8))
    return SD3_TEXT_TOKENS


def scheduler_config_of(folder: str) -> dict | None:
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    return read_json(path) if os.path.isfile(path) else None


__all__ = [
    "BACKENDS",
    "BF16_MIN_OPSET",
    "DEFAULT_BUCKETS",
    "DEFAULT_OPSET",
    "DTYPES",
    "ExportRequest",
    "MIN_OPSET",
    "check_opset",
    "max_opset",
    "ONNX_FLOAT",
    "SD3_TEXT_TOKENS",
    "scheduler_config_of",
    "text_tokens_of",
    "vae_scale_factor_of",
]
