"""The export driver: build (or finish building) an engine folder from an :class:`ExportPlan`.

:func:`export_engines` checks the request and the folder before any work (the folder can be
written; the memory plan fits; the opset is one the exporter writes and ONNX Runtime runs), then,
holding the folder's lock (:class:`~.folder.FolderLock`: a second export into the same folder
waits up to ``wait`` seconds, then is refused), runs the build steps (:mod:`.onnx_steps`) graph by
graph with a progress bar per graph.

Resuming: each graph's manifest entry records a key (sha256 of everything it was built from) and
its files' sizes and hashes; a rerun skips every graph whose key matches and whose files are
intact, so an interrupted export picks up where it stopped. Files are written into a temporary
folder inside the engine folder and renamed into place only once complete, and the manifest is
rewritten (atomically) after each graph, so a failure at any point leaves the earlier engines and
the earlier manifest as they were. Temporaries carry the export's prefix; the next export of the
folder removes those a killed one left, and nothing else.

Replacing: a folder holding engines of another configuration (weights, resolution, text tokens,
precision, fp32 blocks, opset), or a manifest that cannot be read, is refused unless
``overwrite``; then the new set is built in a sibling folder and swapped in at the end
(:func:`~.folder.swap_in`), so a failed or interrupted export leaves the earlier engines intact
and loadable. A folder holding files no export wrote is never built into nor replaced. The graphs
take any batch and any number of masked tokens, so neither the batch nor the buckets decide which
graphs to build (they shape TensorRT's profiles).

``backend="tensorrt"`` exports the same ONNX graphs (they stay in the folder as the reference),
checks each against the torch graph with ONNX Runtime, then builds one TensorRT engine per graph
for this GPU and TensorRT version (:mod:`.tensorrt_build`; ``--compiler torch-tensorrt``:
:mod:`.torch_tensorrt_build`).
"""

from __future__ import annotations

import os
import shutil
from typing import Callable

from tqdm.auto import tqdm

from hybridstitch.engine.manifest import MANIFEST_NAME, GraphEntry, Manifest, read_manifest, utc_now
from hybridstitch.errors import HybridStitchError
from hybridstitch.outputs import check_output_folder

from .folder import FolderLock, foreign_entries, remove_stale_temporaries, staging_folder, swap_in
from .graphs import GRAPH_MODULES, GraphShapes, dynamic_shapes, example_inputs, trace_sizes
from .onnx_steps import DenoiserFromCheckpoint, FilesFromOnnx, OnnxFromGraph, exporter_messages
from .plan import ExportPlan, GraphPlan, config_mismatch, plan_export
from .request import DTYPES, ExportRequest


def export_engines(req: ExportRequest, out: str, progress: bool = True, toolchain=None, quiet: bool = False,
                   wait: float | None = 0.0) -> Manifest:
    """Build (or finish building) the engines of ``req`` in ``out``; returns the manifest written.

    Raises HybridStitchError for bad requests, for folders that cannot be written or hold other
    engines (or other files), and while another export holds the folder, before anything is
    built. ``quiet``: no warnings or log lines from the exporter (its known noise is silenced
    always). ``wait``: seconds to wait for another export of ``out`` (0: refuse at once; None: no
    limit). ``toolchain`` (TensorRT exports only): what builds and inspects engines,
    :class:`~.tensorrt_build.TensorRTToolchain` by default.
    """
    check_output_folder(out, "--out")  # before any work: a read-only folder is found now, not after the export
    if req.gpu_memory_gb is not None:  # the memory plan first: nothing is read or written for a set that cannot fit
        from .memory_plan import check_fits, plan_for_request

        check_fits(plan_for_request(req, req.encoders), req.gpu_memory_gb)
    plan = plan_export(req)
    if req.backend == "tensorrt":
        from .tensorrt_build import TensorRTToolchain

        toolchain = toolchain or TensorRTToolchain()
        toolchain.check_available(req.tensorrt)  # before anything is written
    folder = os.path.realpath(out)  # a link to an engine folder: the swap happens where the folder is
    if os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, MANIFEST_NAME)):
        _existing(folder, out, plan.manifest, req.overwrite)  # a folder of other files: refused before the lock file
    with FolderLock(folder, wait=wait), exporter_messages(quiet):
        remove_stale_temporaries(folder)
        old, replace = _existing(folder, out, plan.manifest, req.overwrite)
        if not replace:
            return _build(plan, folder, old, loaders_for(req, plan), progress, toolchain)
        _check_replaceable(folder, out)
        staging = staging_folder(folder)
        try:
            manifest = _build(plan, staging, None, loaders_for(req, plan), progress, toolchain)
            swap_in(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # the earlier engines were never touched
            raise
        return manifest


def loaders_for(req: ExportRequest, plan: ExportPlan) -> dict:
    blocks = {"large": plan.manifest.fp32_blocks, "small": []}
    return {role: DenoiserFromCheckpoint(getattr(req, role), role, DTYPES[req.precision], blocks[role])
            for role in ("large", "small")}


def _shown(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _existing(folder: str, out: str, manifest: Manifest, overwrite: bool) -> tuple[Manifest | None, bool]:
    """What ``folder`` holds: ``(old manifest to resume from, whether to replace the folder)``."""
    if not os.path.isfile(os.path.join(folder, MANIFEST_NAME)):
        foreign = foreign_entries(folder, with_manifest=False)
        if foreign:
            raise HybridStitchError(
                f"{out} holds {_shown(foreign)} but no engine manifest.json: it is not an engine folder, and the "
                "export never writes over files it did not make. Export into a new or empty folder (--out)"
            )
        return None, False  # a new folder, or one whose first export stopped before its manifest
    try:
        old = read_manifest(folder)
    except HybridStitchError as e:
        if not overwrite:
            raise HybridStitchError(f"{e}. To replace that folder's engines, pass --overwrite") from e
        return None, True
    why = config_mismatch(old, manifest)
    if why is None:
        return old, False
    if not old.graphs:  # an export that stopped before its first graph: nothing there to keep
        return None, False
    if not overwrite:
        raise HybridStitchError(
            f"{out} holds engines of another configuration: {why}. Export into another folder (--out), "
            "or pass --overwrite to replace them (they stay loadable until the new engines are complete)"
        )
    return None, True


def _check_replaceable(folder: str, out: str) -> None:
    """--overwrite swaps a sibling folder in: the folder must hold engines only, and its parent be writable."""
    foreign = foreign_entries(folder)
    if foreign:
        raise HybridStitchError(
            f"--overwrite replaces {out} as a whole, and it holds {_shown(foreign)}, which no export wrote; move "
            "those out of the folder first, or export into another folder (--out)"
        )
    if os.path.ismount(folder):
        raise HybridStitchError(
            f"--overwrite builds the new engines beside {out} and swaps them in, and {out} is a mount point; export "
            "into a folder inside it"
        )
    parent = os.path.dirname(folder)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise HybridStitchError(
            f"--overwrite builds the new engines beside {out} (in {parent}) and swaps them in, and {parent} cannot be "
            "written (permission denied); export into another folder (--out)"
        )


def _build(plan: ExportPlan, out: str, old: Manifest | None, loaders: dict, progress: bool, toolchain) -> Manifest:
    """Build every graph of ``plan`` missing or outdated in ``out`` (resuming from ``old``), then the
    TensorRT engines; returns the manifest written."""
    req, manifest = plan.request, plan.manifest
    if old is not None:
        manifest.created, manifest.updated = old.created, old.updated
        if req.backend == "tensorrt":
            manifest.tensorrt = old.tensorrt  # engine builds of other GPUs / options stay listed
        # Buckets asked for before stay: adding a bucket never drops one (they are TensorRT profiles,
        # the ONNX graphs take any k).
        asked = {b.masked_tokens for b in manifest.buckets}
        manifest.buckets += [b for b in old.buckets if b.masked_tokens not in asked]
        manifest.buckets.sort(key=lambda b: b.ratio)
    else:
        manifest.created = utc_now()
        manifest.complete = False
        manifest.save(out)  # before the first graph lands: the folder never holds graphs no manifest claims

    for g in plan.graphs:
        previous = old.graphs.get(g.name) if old is not None else None
        bar = tqdm(total=4, desc=f"{g.name}", unit="step", disable=not progress, leave=True)
        try:
            if previous is not None and previous.key == g.key and previous.check_files(out) is None:
                manifest.graphs[g.name] = previous
                bar.set_postfix_str("up to date")
                bar.update(4)
                continue
            manifest.graphs[g.name] = _build_graph(g, plan, loaders[g.role], out, bar)
            manifest.updated = utc_now()
            manifest.complete = False
            manifest.save(out)  # progress survives an interruption
        finally:
            bar.close()
    manifest.complete = True
    manifest.updated = manifest.updated or utc_now()
    if old is None or old.to_dict() != manifest.to_dict():  # an up-to-date rerun writes nothing
        manifest.save(out)
    if req.backend == "tensorrt":
        from .tensorrt_build import build_engines

        build_engines(plan, out, loaders, progress=progress, toolchain=toolchain)
    return manifest


def _build_graph(g: GraphPlan, plan: ExportPlan, load: Callable, out: str, bar) -> GraphEntry:
    req = plan.request
    bar.set_postfix_str("load")
    denoiser = load()
    bar.update(1)
    module = GRAPH_MODULES[g.kind](denoiser)
    shapes = GraphShapes(req.batch, *plan.manifest.latent_size, plan.manifest.tokens["text"])
    batch, k = trace_sizes(denoiser.spec, shapes)
    example = example_inputs(g.kind, denoiser.spec, shapes, DTYPES[req.precision], k, batch=batch)
    bar.set_postfix_str("export")
    model = OnnxFromGraph(module, [t.name for t in g.inputs], [t.name for t in g.outputs], example, req.opset,
                          dynamic_shapes(g.kind, denoiser.spec, shapes))()
    _check_io(model, g)
    bar.update(1)
    bar.set_postfix_str("save")
    files, data_name = FilesFromOnnx(model, out, g.name)()
    bar.update(1)
    from hybridstitch.plugins.onnx_op import count_nodes

    entry = GraphEntry(
        kind=g.kind, file=f"{g.name}.onnx", key=g.key, inputs=g.inputs, outputs=g.outputs, files=files,
        external_data=data_name, custom_nodes=count_nodes(model), built=utc_now(),
    )
    bar.set_postfix_str("done")
    bar.update(1)
    return entry


def _check_io(model, g: GraphPlan) -> None:
    """The exported graph has exactly the planned names, shapes and dtypes (an internal invariant)."""
    def dims(shape):  # fixed sizes as ints, symbolic dimensions by name
        return [d if isinstance(d, int) else str(d) for d in shape]

    got_in = [(v.name, dims(v.shape), v.dtype.name.lower()) for v in model.graph.inputs]
    got_out = [(v.name, dims(v.shape), v.dtype.name.lower()) for v in model.graph.outputs]
    want_in = [(t.name, t.shape, t.dtype) for t in g.inputs]
    want_out = [(t.name, t.shape, t.dtype) for t in g.outputs]
    assert got_in == want_in, f"{g.name}: exported inputs {got_in} != planned {want_in}"
    assert got_out == want_out, f"{g.name}: exported outputs {got_out} != planned {want_out}"


__all__ = ["export_engines"]
