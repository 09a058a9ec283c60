"""``hybridstitch demo``: the embedded default, end to end on the shipped testbed pair.

Exports the testbed's engines for ONNX Runtime (once; later runs reuse them), then generates
one grid of digits per method (large only, small only, HybridStitch), prints each method's
latency and speed-up over large-only, and writes the images, the JSON traces and a picture of
the masks over the steps (which tokens the large model refined, step by step) to a folder.
"""

from __future__ import annotations

import io
import json
import os
import time

import torch

from .config import StitchConfig
from .errors import HybridStitchError
from .fileio import atomic_write_bytes, atomic_write_text

DEMO_PROMPTS = ("a handwritten 0", "a handwritten 3", "a handwritten 5", "a handwritten 8")


def testbed_image_size() -> int:
    """The testbed's training resolution (pixels = latents: its VAE is the identity)."""
    from .loading import read_json
    from .testbed import LARGE_DIR

    return int(read_json(os.path.join(LARGE_DIR, "transformer", "config.json"))["sample_size"])


def _png(fig_or_image) -> bytes:
    buf = io.BytesIO()
    if hasattr(fig_or_image, "savefig"):
        fig_or_image.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    else:
        fig_or_image.save(buf, format="PNG")
    return buf.getvalue()


def _grid_figure(results: dict, prompts):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(results)
    fig, axes = plt.subplots(len(methods), len(prompts), figsize=(1.6 * len(prompts), 1.75 * len(methods)), squeeze=False)
    for r, m in enumerate(methods):
        for c, img in enumerate(results[m]["images"]):
            ax = axes[r][c]
            ax.imshow(img, cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(m, fontsize=8)
            if r == 0:
                ax.set_title(prompts[c], fontsize=8)
    fig.tight_layout()
    return fig


def _mask_figure(traces, images, prompts, patch: int):
    """Rows: prompts; columns: each image's own masked steps. Each cell: the final image, masked tokens in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    masked = [[s for s in trace.steps if s.mask_index is not None] for trace in traces]
    width = max((len(m) for m in masked), default=0)
    if not width:
        return None
    fig, axes = plt.subplots(len(prompts), width, figsize=(1.2 * width, 1.3 * len(prompts)), squeeze=False)
    for r, img in enumerate(images):
        base = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0  # [H, W, 3]
        h, w = base.shape[:2]
        cols = w // patch
        for c in range(width):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(masked[r]):  # this image left its masked stage earlier
                ax.axis("off")
                continue
            step = masked[r][c]
            overlay = base * 0.6
            for n in step.mask_index[0]:
                y, x = (n // cols) * patch, (n % cols) * patch
                overlay[y:y + patch, x:x + patch] = [0.95, 0.15, 0.1]
            ax.imshow(overlay, interpolation="nearest")
            ax.set_title(f"step {step.step}, {step.masked_tokens} tok", fontsize=6)
    fig.suptitle("tokens the large model refined (red), per masked step", fontsize=9)
    fig.tight_layout()
    return fig


DEMO_LABELS = ("large", "small", "hybridstitch")


def demo_files(num_prompts: int) -> list[str]:
    """The files a demo run writes into its folder (besides ``engines/``)."""
    return (["grid.png", "masks.png", "summary.json"] + [f"trace-{m}.json" for m in DEMO_LABELS]
            + [f"{m}-{i}.png" for m in DEMO_LABELS for i in range(num_prompts)])


def _is_demo_summary(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"backend", "methods", "prompts"} <= set(data)


def check_out_dir(out_dir: str, num_prompts: int) -> None:
    """The demo writes only into a new folder, an empty one, or an earlier demo's: never over files
    it did not make."""
    from .outputs import check_output_folder

    check_output_folder(out_dir, "--out")
    if not os.path.isdir(out_dir) or _is_demo_summary(os.path.join(out_dir, "summary.json")):
        return
    clash = [f for f in demo_files(num_prompts) if os.path.exists(os.path.join(out_dir, f))]
    if clash:
        shown = ", ".join(clash[:3]) + (f" and {len(clash) - 3} more" if len(clash) > 3 else "")
        raise HybridStitchError(
            f"{out_dir} holds {shown}, which the demo would replace, and no summary.json of an earlier demo run; "
            "choose a new or empty --out folder"
        )


def check_engine_dir(engine_dir: str, req) -> None:
    """The demo reuses engines of its own configuration and builds into a missing or empty folder;
    it never replaces engines (or other files) it did not make."""
    from hybridstitch.engine.manifest import read_manifest
    from hybridstitch.export.plan import config_mismatch, plan_export

    if not os.path.exists(engine_dir):
        return
    fix = f"the demo never replaces them: choose another --out folder, or move {engine_dir} away"
    if not os.path.isdir(engine_dir):
        raise HybridStitchError(f"{engine_dir} is a file where the demo keeps its engines; {fix}")
    if not os.path.isfile(os.path.join(engine_dir, "manifest.json")):
        from hybridstitch.export.folder import foreign_entries

        if foreign_entries(engine_dir, with_manifest=False):  # an export stopped before its first graph
            raise HybridStitchError(f"{engine_dir} holds files but no engine manifest.json; {fix}")
        return
    try:
        old = read_manifest(engine_dir)
    except HybridStitchError as e:
        raise HybridStitchError(f"{engine_dir} holds a manifest the demo cannot read ({e}); {fix}") from e
    why = config_mismatch(old, plan_export(req).manifest)
    if why is not None:
        raise HybridStitchError(f"{engine_dir} holds engines the demo did not make ({why}); {fix}")


def run_demo(
    out_dir: str = "hybridstitch-demo",
    backend: str = "onnxruntime",
    method: str | None = None,
    prompts=DEMO_PROMPTS,
    steps: int = 20,
    guidance_scale: float = 1.25,
    seed: int = 0,
    threads: int = 1,
    progress: bool = True,
) -> dict:
    from . import checks
    from .pipeline import HybridStitchPipeline
    from .testbed import LARGE_DIR as large_dir
    from .testbed import SMALL_DIR as small_dir

    # Every argument and every output path is checked before the export or any run.
    if backend not in ("onnxruntime", "torch"):
        raise HybridStitchError(f"demo backend must be 'onnxruntime' or 'torch', got {backend!r}")
    threads = checks.integer("threads", threads, minimum=1)
    steps = checks.integer("steps", steps, minimum=1)
    guidance_scale = checks.real("guidance_scale", guidance_scale)
    seed = checks.integer("seed", seed, minimum=0, maximum=2**64 - 1)
    prompts = checks.prompts("prompts", prompts)
    method = method or default_testbed_method()
    buckets = StitchConfig.preset(method).mask_ratios
    check_out_dir(out_dir, len(prompts))
    if backend == "onnxruntime":
        from hybridstitch.export import ExportRequest, export_engines

        engine_dir = os.path.join(out_dir, "engines")
        # One engine set for len(prompts) images with guidance (CFG doubles the batch; the graphs take
        # any batch). A rerun finds the engines built and valid and skips the export.
        size = testbed_image_size()
        req = ExportRequest(large=large_dir, small=small_dir, height=size, width=size, batch=2 * len(prompts),
                            buckets=buckets, precision="fp32")
        check_engine_dir(engine_dir, req)

    torch.set_num_threads(threads)
    os.makedirs(out_dir, exist_ok=True)
    if backend == "onnxruntime":
        export_engines(req, engine_dir, progress=progress, quiet=True)  # the exporter's warnings mean nothing here
        pipe = HybridStitchPipeline.from_engines(engine_dir, num_threads=threads)
    else:
        pipe = HybridStitchPipeline.from_pretrained(large=large_dir, small=small_dir)

    methods = {"large": "large", "small": "small", "hybridstitch": method}
    size = testbed_image_size()
    kwargs = dict(prompt=list(prompts), num_inference_steps=steps, guidance_scale=guidance_scale, progress=progress,
                  height=size, width=size)
    # Warm-up once (session initialisation, allocator), then one timed run per method.
    pipe(config="small", **{**kwargs, "num_inference_steps": 2, "progress": False})
    results = {}
    for label, preset in methods.items():
        t0 = time.perf_counter()
        out = pipe(config=preset, generator=torch.Generator().manual_seed(seed), record_masks=True, **kwargs)
        results[label] = dict(images=out.images, traces=out.traces, seconds=time.perf_counter() - t0)

    base = results["large"]["seconds"]
    summary = {"backend": backend, "threads": threads, "steps": steps, "prompts": list(prompts), "methods": {}}
    print(f"\nhybridstitch demo: {len(prompts)} prompts, {steps} steps, CFG {guidance_scale}, {backend}, {threads} thread(s)")
    print(f"{'method':<28} {'seconds':>8} {'speed-up':>9}  stages")
    for label, res in results.items():
        traces = res["traces"]  # one per image: each takes its own stages
        name = methods[label] if label != "hybridstitch" else f"hybridstitch ({method})"
        speed = base / res["seconds"]
        switches = " ".join(str(t.switch_steps) for t in traces)
        print(f"{name:<28} {res['seconds']:>8.2f} {speed:>8.2f}x  switch steps per image {switches}")
        summary["methods"][label] = dict(preset=methods[label], seconds=res["seconds"], speedup=speed,
                                         stage_counts=[t.stage_counts for t in traces],
                                         switch_steps=[t.switch_steps for t in traces])
        atomic_write_text(os.path.join(out_dir, f"trace-{label}.json"),
                          json.dumps([t.to_dict() for t in traces], indent=1))
        for i, img in enumerate(res["images"]):
            atomic_write_bytes(os.path.join(out_dir, f"{label}-{i}.png"), _png(img))

    import matplotlib.pyplot as plt

    fig = _grid_figure(results, list(prompts))
    atomic_write_bytes(os.path.join(out_dir, "grid.png"), _png(fig))
    plt.close(fig)
    fig = _mask_figure(results["hybridstitch"]["traces"], results["hybridstitch"]["images"], list(prompts),
                       pipe.large.spec.patch_size * pipe.vae_scale_factor)
    if fig is not None:
        atomic_write_bytes(os.path.join(out_dir, "masks.png"), _png(fig))
        plt.close(fig)
    atomic_write_text(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=2))
    print(f"\nwrote {os.path.abspath(out_dir)}: grid.png, masks.png, <method>-<i>.png, trace-<method>.json, summary.json")
    return summary


def default_testbed_method() -> str:
    """The calibrated testbed preset the demo shows (see README, calibration)."""
    from .config import PRESETS

    return "testbed-30" if "testbed-30" in PRESETS else "hybridstitch-30"
