"""Make an exported ONNX model reach the CachedKVAttention TensorRT plugin.

The exported graph carries each ``hybridstitch::CachedKVAttention`` node together with an
ONNX local function of the same (domain, name) holding its standard-op decomposition; ONNX
Runtime runs that function. TensorRT's ONNX parser imports a node whose op type it does not
know through its fallback plugin importer: it looks up a plugin creator by

    name = node.op_type, version = node attribute "plugin_version" (default "1"),
    namespace = node attribute "plugin_namespace" (default "")

and passes the node's attributes the creator declares as plugin fields. A node that names a
local function is imported as that function instead (recent parsers try the plugin registry
first, older ones do not), so for TensorRT we strip the function and name the namespace:

- :func:`strip_local_functions` removes the functions of our domain (and helper functions only
  they called), keeping the nodes, their attributes, the domain's ``opset_import`` and the
  graph's ``value_info`` shapes;
- :func:`add_plugin_attributes` sets ``plugin_namespace = "hybridstitch"`` (our plugins are not
  in the default namespace "") and ``plugin_version = "1"`` on those nodes, and ``aot = 1``.

``aot``: TensorRT's parser (10.9+) reads this integer attribute of a plugin node to ask a
``tensorrt.plugin`` creator for its ahead-of-time implementation strictly (NVIDIA's
``samples/python/quickly_deployable_plugins``: "a bool attribute called "aot" ... set to True";
ONNX has no boolean attributes, so onnx-graphsurgeon and ``onnx.helper`` write it as the INT 1).
Without it the creator may be asked for a JIT plugin, which this one does not have; with it a
plugin registered without an AOT implementation fails at parse time, naming the plugin
("AOT implementation requested, but not defined"), instead of later.

:func:`prepare_for_tensorrt` does both; :func:`prepare_file_for_tensorrt` does it on files,
including models whose weights live in external data files (SD3.5 Large is over 2 GB).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import onnx

from hybridstitch.errors import HybridStitchError

from .cached_kv import OP_DOMAIN, OP_NAME, OP_VERSION


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph under it (If/Loop/Scan bodies)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _graphs(sub)


def _called(nodes) -> set[tuple[str, str]]:
    return {(node.domain, node.op_type) for node in nodes}


def _reachable_functions(model: onnx.ModelProto) -> set[tuple[str, str]]:
    """(domain, name) of the local functions the graph calls, directly or through other functions."""
    functions = {(f.domain, f.name): f for f in model.functions}
    frontier = set()
    for graph in _graphs(model.graph):
        frontier |= _called(graph.node) & functions.keys()
    reached: set[tuple[str, str]] = set()
    while frontier:
        key = frontier.pop()
        reached.add(key)
        body = [n for n in functions[key].node]
        for node in list(body):
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    body += [n for g in _graphs(attr.g) for n in g.node]
        frontier |= (_called(body) & functions.keys()) - reached
    return reached


def strip_local_functions(model: onnx.ModelProto, domain: str = OP_DOMAIN) -> onnx.ModelProto:
    """A copy of ``model`` without the local functions of ``domain``.

    The nodes calling them stay as they are (op type, domain, inputs, outputs, attributes),
    as do ``opset_import`` (the parser and checker need the custom domain declared) and
    ``value_info``. Functions that only the removed ones called go too; any other function,
    called or not, is kept.
    """
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    reachable_before = _reachable_functions(stripped)
    kept = [f for f in stripped.functions if f.domain != domain]
    del stripped.functions[:]
    stripped.functions.extend(kept)
    # prune helpers orphaned by the removal, never functions that were unreachable already
    orphaned = reachable_before - _reachable_functions(stripped)
    kept = [f for f in stripped.functions if (f.domain, f.name) not in orphaned]
    del stripped.functions[:]
    stripped.functions.extend(kept)

    uses_domain = any(node.domain == domain for graph in _graphs(stripped.graph) for node in graph.node)
    if uses_domain and not any(opset.domain == domain for opset in stripped.opset_import):
        # a function-only model may declare the domain nowhere else; the checker needs it
        stripped.opset_import.append(onnx.helper.make_opsetid(domain, int(OP_VERSION)))
    return stripped


# The attributes TensorRT's parser consumes itself (never handed to the plugin creator).
PARSER_ATTRIBUTES = ("plugin_namespace", "plugin_version", "aot")


def add_plugin_attributes(
    model: onnx.ModelProto,
    op_type: str = OP_NAME,
    domain: str = OP_DOMAIN,
    plugin_namespace: str = OP_DOMAIN,
    plugin_version: str = OP_VERSION,
    aot: bool = True,
) -> int:
    """Set the string attributes ``plugin_namespace``/``plugin_version`` and the integer ``aot`` on
    every ``domain::op_type`` node, in place (replacing earlier values). Returns how many nodes
    were tagged."""
    tagged = 0
    for graph in _graphs(model.graph):
        for node in graph.node:
            if node.domain != domain or node.op_type != op_type:
                continue
            kept = [a for a in node.attribute if a.name not in PARSER_ATTRIBUTES]
            del node.attribute[:]
            node.attribute.extend(kept)
            node.attribute.extend(
                [
                    onnx.helper.make_attribute("plugin_namespace", plugin_namespace),
                    onnx.helper.make_attribute("plugin_version", plugin_version),
                    onnx.helper.make_attribute("aot", int(aot)),
                ]
            )
            tagged += 1
    return tagged


def prepare_for_tensorrt(model: onnx.ModelProto) -> onnx.ModelProto:
    """Strip our local functions and tag our nodes for the plugin; returns a new model."""
    prepared = strip_local_functions(model)
    add_plugin_attributes(prepared)
    return prepared


def _has_external_data(model: onnx.ModelProto) -> bool:
    tensors = list(model.graph.initializer)
    for graph in _graphs(model.graph):
        for node in graph.node:
            tensors += [a.t for a in node.attribute if a.type == onnx.AttributeProto.TENSOR]
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in tensors)


def prepare_file_for_tensorrt(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """:func:`prepare_for_tensorrt` from file ``src`` to file ``dst``; returns ``dst``.

    Weights in external data files are not loaded or rewritten: the prepared graph keeps
    pointing at them by relative path, so ``dst`` must sit in ``src``'s folder then.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise HybridStitchError(f"no ONNX model at {src}")
    model = onnx.load(str(src), load_external_data=False)
    if _has_external_data(model) and src.resolve().parent != dst.resolve().parent:
        raise HybridStitchError(
            f"{src} keeps its weights in external data files next to it; write the prepared model "
            f"into the same folder ({src.parent}), not {dst.parent}"
        )
    prepared = prepare_for_tensorrt(model)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    onnx.save(prepared, str(tmp))
    os.replace(tmp, dst)  # never leave a half-written model under the final name
    return dst
