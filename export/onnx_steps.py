"""Build steps of the ONNX export, small callables named for what they turn into what (as
Polygraphy's loaders), so they compose and run only when called:

    DenoiserFromCheckpoint(folder, role, dtype)()          -> TorchDenoiser
    OnnxFromGraph(module, inputs, outputs, example, opset)() -> onnx_ir.Model (custom node + function)
    FilesFromOnnx(model, folder, name, threshold)()          -> [{name, size, sha256}] written atomically

plus :class:`UpcastBlock` (a block kept in float32 inside a fp16 graph) and the Einsum ->
Transpose rewrite the exported graphs get.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import warnings

import torch

from hybridstitch.denoiser import TransformerSpec
from hybridstitch.engine.manifest import EXPORT_TMP_PREFIX, file_record
from hybridstitch.errors import HybridStitchError


STRIPPED_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node", "pkg.torch.onnx.class_hierarchy")
# What torch.onnx prints on every export that says nothing about the graphs being exported: a
# line per torchvision op it skips (torchvision is not a dependency), a note that the batch axis
# keeps its name, and a deprecation inside torch's own pytree code.
EXPORTER_NOISE_LOGGER = "torch.onnx._internal.exporter._registration"
EXPORTER_NOISE = ((UserWarning, r"# The axis name: .* will not be used"),
                  (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"))
# The exporter's libraries, silenced below ERROR with ``quiet``.
EXPORTER_LOGGERS = ("torch.onnx", EXPORTER_NOISE_LOGGER, "torch.export", "onnxscript", "onnx_ir")


@contextlib.contextmanager
def exporter_messages(quiet: bool = False):
    """Scope the exporter's output: its known noise (:data:`EXPORTER_NOISE`) is always dropped; with
    ``quiet`` every warning and every log record below ERROR of its libraries too. Filters and
    logger levels are restored on exit."""
    names = EXPORTER_LOGGERS if quiet else (EXPORTER_NOISE_LOGGER,)
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore")
        else:
            for category, message in EXPORTER_NOISE:
                warnings.filterwarnings("ignore", message=message, category=category)
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)

class UpcastBlock(torch.nn.Module):
    """One transformer block run in float32 inside a lower-precision model.

    Inputs are cast up and outputs back down at the block's edges, so an exported fp16 graph
    holds this block's weights and arithmetic in float32 (strongly typed TensorRT builds keep
    the ONNX types). This is what TensorRT's SD3.5 Large demo does to block 35, whose
    activations overflow fp16. The block's image-token K/V cache slots are cast too: the
    masked graph's cache inputs and outputs stay in the engine precision.
    """

    def __init__(self, block: torch.nn.Module, layer: int, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.output_dtype = next(block.parameters()).dtype
        self.compute_dtype = compute_dtype
        self.layer = layer
        self.context_pre_only = block.context_pre_only  # read by diffusers' transformer loop
        self.block = block.to(compute_dtype)

    def _cast_cache(self, stitch, dtype: torch.dtype) -> None:
        for slot in ((self.layer, "attn"), (self.layer, "attn2")):
            kv = stitch.cache.layers.get(slot)
            if kv is not None:
                stitch.cache.layers[slot] = (kv[0].to(dtype), kv[1].to(dtype))

    def forward(self, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs=None):
        stitch = (joint_attention_kwargs or {}).get("stitch")
        if stitch is not None and stitch.mode == "masked":
            self._cast_cache(stitch, self.compute_dtype)  # the op wants one float type
        up = lambda x: x.to(self.compute_dtype) if isinstance(x, torch.Tensor) else x  # noqa: E731
        out = self.block(
            hidden_states=up(hidden_states), encoder_hidden_states=up(encoder_hidden_states), temb=up(temb),
            joint_attention_kwargs=joint_attention_kwargs,
        )
        if stitch is not None:
            self._cast_cache(stitch, self.output_dtype)  # caches leave the block in the engine precision
        return tuple(o.to(self.output_dtype) if isinstance(o, torch.Tensor) else o for o in out)


# SD3.5 Large (38 blocks of 38 heads): TensorRT's demo/Diffusion upcasts transformer_blocks[35] in fp16.
SD35_LARGE_FP32_BLOCKS = (35,)


def resolve_fp32_blocks(requested: tuple[int, ...] | None, precision: str, spec: TransformerSpec) -> list[int]:
    """The large-model blocks to export in float32: ``requested``, or automatically block 35 of
    SD3.5 Large in fp16 (bf16 and fp32 have float32's range and need none)."""
    if precision == "fp32":
        return []  # the whole graph is float32 already
    if requested is None:
        sd35_large = spec.num_layers == 38 and spec.num_heads == 38
        return list(SD35_LARGE_FP32_BLOCKS) if precision == "fp16" and sd35_large else []
    bad = [i for i in requested if i >= spec.num_layers]
    if bad:
        raise HybridStitchError(
            f"fp32 blocks {bad} do not exist: the large transformer has {spec.num_layers} blocks "
            f"(0..{spec.num_layers - 1})"
        )
    return list(requested)


class DenoiserFromCheckpoint:
    """A diffusers folder -> :class:`TorchDenoiser` in the engine precision (loaded on first call),
    with ``fp32_blocks`` wrapped in :class:`UpcastBlock`."""

    def __init__(self, folder: str, role: str, dtype: torch.dtype, fp32_blocks=()):
        self.folder, self.role, self.dtype = folder, role, dtype
        self.fp32_blocks = tuple(fp32_blocks)
        self._denoiser = None

    def __call__(self):
        if self._denoiser is None:
            from hybridstitch.engine.torch_backend import TorchDenoiser
            from hybridstitch.loading import load_transformer

            # .to(): diffusers 0.42 may leave a checkpoint in its stored dtype despite torch_dtype
            model = load_transformer(self.folder, self.role, self.dtype)
            if next(model.parameters()).dtype != self.dtype:
                model = model.to(self.dtype)
            self._denoiser = TorchDenoiser(model, self.role)  # installs the stitch processors first
            for i in self.fp32_blocks:
                model.transformer_blocks[i] = UpcastBlock(model.transformer_blocks[i], i)
        return self._denoiser


class OnnxFromGraph:
    """An ``nn.Module`` graph -> ``onnx_ir.Model`` with the given input/output names.

    Traced under :func:`~hybridstitch.plugins.export_mode`, so each cached-KV attention becomes
    one ``hybridstitch::CachedKVAttention`` node; the op's local function is attached after the
    exporter's passes (see ``plugins/onnx_op.py`` for why).
    """

    def __init__(self, module: torch.nn.Module, input_names, output_names, example: tuple, opset: int,
                 dynamic_shapes: dict | None = None):
        self.module, self.example, self.opset = module, example, opset
        self.input_names, self.output_names = list(input_names), list(output_names)
        self.dynamic_shapes = dynamic_shapes

    def __call__(self):
        from hybridstitch.plugins import export_mode
        from hybridstitch.plugins.onnx_op import attach_function, custom_translation_table

        with export_mode(), torch.no_grad():
            program = torch.onnx.export(
                self.module.eval(), self.example, dynamo=True, opset_version=self.opset,
                custom_translation_table=custom_translation_table(), input_names=self.input_names,
                output_names=self.output_names, verbose=False, optimize=True, dynamic_shapes=self.dynamic_shapes,
            )
        model = program.model
        written = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
        if written != self.opset:
            # torch.onnx logs a failed version conversion and keeps its own opset: refuse before any file
            raise HybridStitchError(
                f"the ONNX exporter wrote opset {written}, not the opset {self.opset} asked for (its version "
                f"converter failed); nothing was saved. Export with --opset {written}"
            )
        for node in model.graph.all_nodes():
            # the exporter's per-node debug records hold source paths and stack traces of this
            # machine: drop them (keep the module scope names, useful in profiles)
            for key in STRIPPED_METADATA:
                node.metadata_props.pop(key, None)
        permutations_to_transpose(model)
        attach_function(model)
        return model


def _permutation(equation: str) -> list[int] | None:
    """``"nhwpqc->nchpwq"`` -> ``[0, 5, 1, 3, 2, 4]``; None when the equation is not a pure permutation."""
    if equation.count("->") != 1 or "," in equation or "." in equation:
        return None
    src, dst = (side.strip() for side in equation.split("->"))
    if len(set(src)) != len(src) or sorted(src) != sorted(dst):
        return None
    return [src.index(c) for c in dst]


def permutations_to_transpose(model) -> int:
    """Replace every one-input ``Einsum`` that only permutes axes (diffusers' unpatchify
    ``nhwpqc->nchpwq``) by the equivalent ``Transpose``, in place; returns how many.

    Same values bit for bit, and ONNX's Einsum has no bfloat16 type (a bf16 graph with one fails
    the checker); TensorRT also runs a Transpose as a plain shuffle."""
    import onnx_ir as ir

    replaced = 0
    for node in list(model.graph):
        if node.op_type != "Einsum" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 1:
            continue
        attr = node.attributes.get("equation")
        perm = _permutation(attr.value) if attr is not None else None
        if perm is None:
            continue
        transpose = ir.Node("", "Transpose", inputs=[node.inputs[0]], attributes=[ir.AttrInt64s("perm", perm)],
                            name=f"{node.name}_transpose" if node.name else None)
        transpose.metadata_props.update(node.metadata_props)
        ir.convenience.replace_nodes_and_values(model.graph, node, [node], [transpose], node.outputs, transpose.outputs)
        replaced += 1
    return replaced


class FilesFromOnnx:
    """``onnx_ir.Model`` -> ``folder/name.onnx`` + ``name.onnx.data`` (the weights, as external data),
    written in a temporary folder and renamed into place; returns the file records.

    Weights always go to external data, written tensor by tensor from the tensors the model
    already holds: serialising them into the protobuf instead would hold two more copies (the
    message and its bytes), and the protobuf limit is 2 GB anyway. Measured on a 1.28 GB graph:
    peak resident memory of the export 1.97 GB with external data, 4.56 GB inline.
    ``external_data_threshold``: weights of at most this many bytes stay inline (tests)."""

    def __init__(self, model, folder: str, name: str, external_data_threshold: int = 0):
        self.model, self.folder, self.name = model, folder, name
        self.threshold = external_data_threshold

    def weight_bytes(self) -> int:
        return sum(v.const_value.nbytes for v in self.model.graph.initializers.values() if v.const_value is not None)

    def __call__(self) -> tuple[list[dict], str | None]:
        import onnx_ir as ir

        onnx_name = f"{self.name}.onnx"
        data_name = f"{onnx_name}.data" if self.weight_bytes() > self.threshold else None
        tmp = tempfile.mkdtemp(dir=self.folder, prefix=f"{EXPORT_TMP_PREFIX}{self.name}-")
        try:
            ir.save(self.model, os.path.join(tmp, onnx_name), external_data=data_name)
            names = [n for n in (data_name, onnx_name) if n]  # data first: the .onnx lands last
            for n in names:
                with open(os.path.join(tmp, n), "rb") as f:
                    os.fsync(f.fileno())
            for n in names:
                os.replace(os.path.join(tmp, n), os.path.join(self.folder, n))
            # hashed (and stat'ed: a rename moves ctime) where the files now live
            records = [file_record(os.path.join(self.folder, n), n) for n in names]
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return records[::-1], data_name  # .onnx first in the manifest


__all__ = [
    "DenoiserFromCheckpoint",
    "exporter_messages",
    "FilesFromOnnx",
    "OnnxFromGraph",
    "SD35_LARGE_FP32_BLOCKS",
    "UpcastBlock",
    "permutations_to_transpose",
    "resolve_fp32_blocks",
]
