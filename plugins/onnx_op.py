"""The ONNX form of ``hybridstitch::CachedKVAttention``: one custom-domain node with a local function.

The exported masked graphs hold one node per attention slot::

    op_type = OP_NAME ("CachedKVAttention"), domain = OP_DOMAIN ("hybridstitch")
    inputs  = query [B,H,k+T,D], key [B,H,k+T,D], value [B,H,k+T,D],
              cache_k [B,H,N,D], cache_v [B,H,N,D], index [B,k] int64
    outputs = out [B,H,k+T,D], cache_k' [B,H,N,D], cache_v' [B,H,N,D]

and the model carries an ONNX local function of the same (domain, name) whose body is the
standard-op decomposition (:func:`cached_kv_function`): ``ScatterND`` writes the fresh image
K/V rows into the caches, ``Concat`` appends the text K/V, then
``MatMul -> Mul(D^-0.5) -> Softmax -> MatMul`` with the softmax in float32. ONNX Runtime
inlines model-local functions when it loads a model, so it runs the node as is; the TensorRT
build strips the function so its parser reaches the plugin (``plugins/onnx_for_tensorrt.py``).

How the exporter emits it, in two steps:

1. During export the torch processors call :func:`cached_kv_attention_export`, a
   ``torch.library`` custom op that ``torch.export`` keeps as one opaque call (switched on by
   :func:`hybridstitch.plugins.dispatch.export_mode`). ``torch.onnx.export(...,
   custom_translation_table=custom_translation_table())`` maps that call to one node of the
   custom domain (:func:`_emit_node`: an onnxscript ``Op`` with the schema :func:`op_schema`).
2. :func:`attach_function` then adds the local function, with its body written at the
   model's final opset. It is added after the exporter's own passes on purpose: the
   exporter's version conversion and optimizer inline every local function they see, which
   would dissolve the node into its decomposition.

The decomposition uses plain MatMul/Softmax rather than opset 23's ``Attention``: it runs at
every opset >= 18 on every ONNX Runtime build, and it is the "no-plugin" form TensorRT's own
attention fusion sees.
"""

from __future__ import annotations

import functools

import torch

from .cached_kv import OP_DOMAIN, OP_NAME, OP_VERSION, cached_kv_attention_reference

# The torch op the exporter sees. Named apart from any runtime op (plugins/torch_op.py), so
# the translation table maps exactly the calls made under ``export_mode()``.
EXPORT_OP_QUALNAME = "hybridstitch::cached_kv_attention_export"

INPUT_NAMES = ("query", "key", "value", "cache_k", "cache_v", "index")
OUTPUT_NAMES = ("out", "new_cache_k", "new_cache_v")
FLOAT_TYPES = ("tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)")


@torch.library.custom_op(EXPORT_OP_QUALNAME, mutates_args=())
def cached_kv_attention_export(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    index: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op as one opaque call for ``torch.export``; eager calls run the reference."""
    out, new_k, new_v = cached_kv_attention_reference(query, key, value, cache_k, cache_v, index)
    return out.contiguous(), new_k, new_v  # the fake promises query's (contiguous) layout


@cached_kv_attention_export.register_fake
def _(query, key, value, cache_k, cache_v, index):
    return torch.empty_like(query), torch.empty_like(cache_k), torch.empty_like(cache_v)


@functools.lru_cache(maxsize=None)
def op_schema():
    """The node's ``onnx.defs.OpSchema`` (not registered globally: it only types the exporter's call)."""
    import onnx

    schema = onnx.defs.OpSchema
    single = schema.FormalParameterOption.Single
    inputs = [schema.FormalParameter(n, "T", param_option=single) for n in INPUT_NAMES[:5]]
    inputs.append(schema.FormalParameter("index", "tensor(int64)", param_option=single))
    outputs = [schema.FormalParameter(n, "T", param_option=single) for n in OUTPUT_NAMES]
    return schema(
        OP_NAME,
        OP_DOMAIN,
        int(OP_VERSION),
        "Cached-KV concat attention (hybridstitch DESIGN.md section 5)",
        inputs=inputs,
        outputs=outputs,
        type_constraints=[("T", list(FLOAT_TYPES), "query, key, value and the caches")],
    )


def _emit_node(query, key, value, cache_k, cache_v, index):
    """Translation of the export op: one ``hybridstitch::CachedKVAttention`` node, three outputs."""
    import onnxscript

    custom = onnxscript.values.Opset(OP_DOMAIN, int(OP_VERSION))
    node = onnxscript.values.Op(custom, OP_NAME, op_schema=op_schema())
    return node(query, key, value, cache_k, cache_v, index)


def custom_translation_table() -> dict:
    """``torch.onnx.export(..., custom_translation_table=...)`` for graphs traced under ``export_mode()``."""
    return {torch.ops.hybridstitch.cached_kv_attention_export.default: _emit_node}


@functools.lru_cache(maxsize=None)
def cached_kv_function(opset_version: int = 18):
    """The op's local function as an ``onnxscript.OnnxFunction``, its body at opset ``opset_version``.

    The body imports the standard domain at the model's own version: ONNX Runtime and the
    checker want a function and the graph it serves to agree on it.
    """
    import onnxscript

    op = onnxscript.values.Opset("", opset_version)
    custom = onnxscript.values.Opset(OP_DOMAIN, int(OP_VERSION))
    float32 = 1  # onnx.TensorProto.FLOAT

    @onnxscript.script(custom, default_opset=op)
    def CachedKVAttention(query, key, value, cache_k, cache_v, index):
        # index [B, k] -> k as a 1-element tensor; image tokens are rows [0, k) of key/value
        k = op.Shape(index, start=1, end=2)
        zero = op.Constant(value_ints=[0])
        axis2 = op.Constant(value_ints=[2])
        last = op.Constant(value_ints=[9223372036854775807])
        key_img = op.Slice(key, zero, k, axis2)  # [B, H, k, D]
        value_img = op.Slice(value, zero, k, axis2)
        key_txt = op.Slice(key, k, last, axis2)  # [B, H, T, D]
        value_txt = op.Slice(value, k, last, axis2)
        # The cache rows to write, as ScatterND indices [B, H, k, 3] = (b, h, index[b, j]): each
        # index names one whole row of D values, so the write is k row copies per (b, h) --
        # ScatterElements would need a [B, H, k, D] index and a lookup per element (8x slower
        # on ONNX Runtime's CPU provider at k = N, where the full step runs this graph too).
        one = op.Constant(value_ints=[1])
        rows = op.Concat(op.Shape(key_img, start=0, end=3), one, axis=0)  # [B, H, k, 1]
        batch = op.Squeeze(op.Shape(cache_k, start=0, end=1))
        heads = op.Squeeze(op.Shape(cache_k, start=1, end=2))
        b_ids = op.Unsqueeze(op.Range(op.Constant(value_int=0), batch, op.Constant(value_int=1)),
                             op.Constant(value_ints=[1, 2, 3]))  # [B, 1, 1, 1]
        h_ids = op.Unsqueeze(op.Range(op.Constant(value_int=0), heads, op.Constant(value_int=1)),
                             op.Constant(value_ints=[0, 2, 3]))  # [1, H, 1, 1]
        n_ids = op.Unsqueeze(index, op.Constant(value_ints=[1, 3]))  # [B, 1, k, 1]
        rows_nd = op.Concat(op.Expand(b_ids, rows), op.Expand(h_ids, rows), op.Expand(n_ids, rows), axis=3)
        new_cache_k = op.ScatterND(cache_k, rows_nd, key_img)  # [B, H, N, D]
        new_cache_v = op.ScatterND(cache_v, rows_nd, value_img)
        # keys/values [B, H, N + T, D]: all image tokens first, as diffusers' joint attention
        keys = op.Concat(new_cache_k, key_txt, axis=2)
        values = op.Concat(new_cache_v, value_txt, axis=2)
        head_dim = op.Cast(op.Shape(query, start=3, end=4), to=float32)
        scale = op.Div(op.Constant(value_float=1.0), op.Sqrt(head_dim))  # [1]
        # scores [B, H, k + T, N + T]; softmax in float32, also in fp16 engines
        scores = op.Mul(op.Cast(op.MatMul(query, op.Transpose(keys, perm=[0, 1, 3, 2])), to=float32), scale)
        probs = op.CastLike(op.Softmax(scores, axis=-1), query)
        out = op.MatMul(probs, values)  # [B, H, k + T, D]
        return out, new_cache_k, new_cache_v

    return CachedKVAttention


def function_proto(opset_version: int):
    """The local function as an ``onnx.FunctionProto`` (domain OP_DOMAIN, name OP_NAME)."""
    return cached_kv_function(opset_version).to_function_proto()


def model_opset(model) -> int:
    """The standard-domain opset of an ``onnx.ModelProto`` or ``onnx_ir.Model``."""
    if hasattr(model, "opset_imports"):  # onnx_ir.Model
        return int(model.opset_imports[""])
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ValueError("the model imports no standard ONNX opset")


def count_nodes(model) -> int:
    """How many ``CachedKVAttention`` nodes the main graph of a model holds (ModelProto or onnx_ir.Model)."""
    nodes = model.graph if hasattr(model, "opset_imports") else model.graph.node
    return sum(1 for n in nodes if n.domain == OP_DOMAIN and n.op_type == OP_NAME)


def attach_function(model) -> None:
    """Give a model (``onnx.ModelProto`` or ``onnx_ir.Model``) holding ``CachedKVAttention`` nodes
    the op's local function, body at the model's opset, and import the custom domain. Idempotent."""
    opset = model_opset(model)
    identifier = (OP_DOMAIN, OP_NAME, "")
    if hasattr(model, "opset_imports"):  # onnx_ir.Model
        import onnx_ir as ir

        model.functions.pop(identifier, None)
        if count_nodes(model):
            model.functions[identifier] = ir.serde.deserialize_function(function_proto(opset))
            model.opset_imports[OP_DOMAIN] = int(OP_VERSION)
        return

    import onnx

    keep = [f for f in model.functions if not (f.domain == OP_DOMAIN and f.name == OP_NAME)]
    del model.functions[:]
    model.functions.extend(keep)
    if count_nodes(model):
        model.functions.append(function_proto(opset))
        if not any(entry.domain == OP_DOMAIN for entry in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid(OP_DOMAIN, int(OP_VERSION)))
