"""Memory and loading of engine sets, measured against the memory plan (issue: one copy of the large model).

Three parts, each model size in a fresh process (resident memory is per process):

* ``resident``: ONNX Runtime's resident memory (peak RSS, sampled every 2 ms) while the engine set
  of an SD3-shaped random pair is loaded and runs a full large step, a masked step and a small
  step, next to the plan's host figure (:func:`hybridstitch.export.memory_plan.plan_memory`,
  ``backend="onnxruntime"``); at two model sizes; goal: within +-20 %.
* ``export``: peak resident memory of exporting the pair, next to the large graph's weight bytes
  (goal: at most 2 x the weights + 1 GB), at two model sizes, and the straight line through the
  two extrapolated to SD3.5 Large (16.54 GB of fp16 weights).
* ``load``: the load time of a multi-GB engine set (random weights): a copied folder (every file
  hashed once: its stat moved), the same folder again (stat unchanged: nothing hashed), and the
  ONNX Runtime sessions alone; bytes hashed per load.

    python benchmarks/memory.py [--parts resident,export,load] [--load-layers 3] [--out benchmarks/results/memory]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DESCRIPTION = "Resident memory of ONNX Runtime engine sets vs the memory plan, export peak memory, load time."
GB = 1e9

# (layers, heads) of the large model at head dim 64; the small one is 2 layers x 4 heads. Latent 48x48
# (N = 576), 83 text tokens: SD3's image:text proportions at 1/4 scale (benchmarks/masked_forward.py).
SIZES = {"S": (6, 9), "M": (6, 18)}
LATENT, TEXT, BATCH = 48, 83, 2

# Runs in a fresh interpreter: samples its own RSS, prints one JSON line.
SAMPLER = textwrap.dedent("""
    import json, sys, threading, time
    import psutil
    proc = psutil.Process()
    peak = [0]
    def sample():
        while True:
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)
    threading.Thread(target=sample, daemon=True).start()
""")

RESIDENT = SAMPLER + textwrap.dedent("""
    import torch
    torch.set_num_threads(1)
    from hybridstitch.engine.onnxruntime_backend import load_engines
    from hybridstitch.masks import tokens_for_ratio
    time.sleep(0.05)
    base = proc.memory_info().rss
    es = load_engines(sys.argv[1], num_threads=1)
    m = es.manifest
    spec, (h, w), n, t = m.spec("large"), m.latent_size, m.tokens["image"], m.tokens["text"]
    b = int(sys.argv[2])
    x, pe = torch.randn(b, spec.in_channels, h, w), torch.randn(b, t, spec.joint_attention_dim)
    pooled, ts = torch.randn(b, spec.pooled_projection_dim), torch.full((b,), 500.0)
    _, caches = es.large.forward_store(x, pe, pooled, ts)
    k = tokens_for_ratio(0.3, n)
    es.large.forward_masked(x, pe, pooled, ts, torch.arange(k).expand(b, k).contiguous(), caches)
    es.small.forward(x, pe, pooled, ts)
    time.sleep(0.05)
    print(json.dumps(dict(base=base, peak=peak[0])))
""")

EXPORT = SAMPLER + textwrap.dedent("""
    import torch
    torch.set_num_threads(1)
    from hybridstitch.export import ExportRequest, export_engines
    time.sleep(0.05)
    base = proc.memory_info().rss
    large, small, out, px, text = sys.argv[1:6]
    export_engines(ExportRequest(large=large, small=small, height=int(px), width=int(px), text_tokens=int(text),
                                 buckets=(0.3,)), out, progress=False)
    time.sleep(0.05)
    print(json.dumps(dict(base=base, peak=peak[0])))
""")

LOAD = textwrap.dedent("""
    import json, sys, time
    t0 = time.perf_counter()
    from hybridstitch.engine import integrity
    from hybridstitch.engine.onnxruntime_backend import load_engines
    hashed = []
    real = integrity.sha256_file
    def counting(path, *a, **k):
        hashed.append(path)
        return real(path, *a, **k)
    integrity.sha256_file = counting
    t1 = time.perf_counter()
    load_engines(sys.argv[1], num_threads=1)
    t2 = time.perf_counter()
    import os
    print(json.dumps(dict(load_s=t2 - t1, hashed_bytes=sum(os.path.getsize(p) for p in hashed), files_hashed=len(hashed))))
""")


def run_child(code: str, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def random_pair(root: str, layers: int, heads: int, latent: int = LATENT) -> tuple[str, str, int]:
    """An SD3-shaped random pair (large: qk rms_norm, head dim 64) saved as diffusers folders;
    returns (large, small, large weight bytes at fp32)."""
    import torch
    from diffusers import SD3Transformer2DModel

    out = []
    for role, (lay, hd) in (("large", (layers, heads)), ("small", (2, 4))):
        torch.manual_seed(0)
        model = SD3Transformer2DModel(
            sample_size=latent, patch_size=2, in_channels=16, out_channels=16, num_layers=lay, attention_head_dim=64,
            num_attention_heads=hd, joint_attention_dim=256, caption_projection_dim=hd * 64, pooled_projection_dim=128,
            pos_embed_max_size=latent // 2, qk_norm="rms_norm" if role == "large" else None,
        )
        folder = os.path.join(root, role)
        model.save_pretrained(os.path.join(folder, "transformer"))
        out.append((folder, sum(p.numel() * 4 for p in model.parameters())))
        del model
    return out[0][0], out[1][0], out[0][1]


def plan_total(large: str, small: str) -> tuple[float, dict]:
    from hybridstitch.export.memory_plan import plan_memory
    from hybridstitch.loading import read_json

    cfg = [read_json(os.path.join(d, "transformer", "config.json")) for d in (large, small)]
    plan = plan_memory(cfg[0], cfg[1], height=LATENT * 8, width=LATENT * 8, batch=BATCH, text_tokens=TEXT,
                       precision="fp32", backend="onnxruntime")
    return plan.total(), plan.as_bytes()


def part_resident(tmp: str) -> list[dict]:
    from hybridstitch.export import ExportRequest, export_engines

    rows = []
    for name, (layers, heads) in SIZES.items():
        root = os.path.join(tmp, f"resident-{name}")
        large, small, weights = random_pair(root, layers, heads)
        engines = os.path.join(root, "engines")
        export_engines(ExportRequest(large=large, small=small, height=LATENT * 8, width=LATENT * 8, text_tokens=TEXT,
                                     buckets=(0.3,)), engines, progress=False)
        got = run_child(RESIDENT, engines, str(BATCH))
        planned, items = plan_total(large, small)
        rows.append(dict(size=name, layers=layers, width=heads * 64, weights_gb=weights / GB, base_gb=got["base"] / GB,
                         measured_gb=got["peak"] / GB, planned_gb=planned / GB, measured_over_planned=got["peak"] / planned,
                         plan_items_gb={k: v / GB for k, v in items.items()}))
        shutil.rmtree(root)
    return rows


def part_export(tmp: str) -> dict:
    rows = []
    for name, (layers, heads) in SIZES.items():
        root = os.path.join(tmp, f"export-{name}")
        large, small, weights = random_pair(root, layers, heads)
        got = run_child(EXPORT, large, small, os.path.join(root, "engines"), str(LATENT * 8), str(TEXT))
        rows.append(dict(size=name, weights_gb=weights / GB, base_gb=got["base"] / GB, peak_gb=got["peak"] / GB,
                         limit_gb=(2 * weights + GB) / GB, within_limit=got["peak"] <= 2 * weights + GB))
        shutil.rmtree(root)
    (a, b) = rows
    slope = (b["peak_gb"] - a["peak_gb"]) / (b["weights_gb"] - a["weights_gb"])
    intercept = a["peak_gb"] - slope * a["weights_gb"]
    sd35 = 16.54  # SD3.5 Large at fp16 with block 35 in fp32 (the memory plan's weights_large)
    return dict(rows=rows, slope=slope, intercept_gb=intercept,
                sd35_large=dict(weights_gb=sd35, predicted_peak_gb=intercept + slope * sd35, limit_gb=2 * sd35 + 1))


def part_load(tmp: str, layers: int) -> dict:
    from hybridstitch.export import ExportRequest, export_engines

    root = os.path.join(tmp, "load")
    large, small, weights = random_pair(root, layers, 38, latent=32)  # SD3.5 Large's width: 38 heads x 64
    built = os.path.join(root, "engines")
    export_engines(ExportRequest(large=large, small=small, height=256, width=256, text_tokens=TEXT, buckets=(0.3,)),
                   built, progress=False)
    size = sum(os.path.getsize(os.path.join(built, f)) for f in os.listdir(built))
    copied = os.path.join(root, "copied")
    shutil.copytree(built, copied)  # new inodes: every file must be hashed once
    first = run_child(LOAD, copied)
    again = run_child(LOAD, copied)
    exported = run_child(LOAD, built)
    return dict(layers=layers, engine_set_gb=size / GB, large_weights_gb=weights / GB, copied_first=first,
                copied_again=again, as_exported=exported)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=DESCRIPTION)
    ap.add_argument("--parts", default="resident,export,load")
    ap.add_argument("--load-layers", type=int, default=3, help="layers of the 38-head model the load part exports")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "memory"))
    args = ap.parse_args(argv)
    parts = args.parts.split(",")
    from hybridstitch.bench.machine import describe_machine, machine_info
    from hybridstitch.bench.report import write_report

    info = machine_info(1)
    result = dict(date=info["date"][:10], machine=describe_machine(info))
    with tempfile.TemporaryDirectory(prefix="hybridstitch-memory-") as tmp:
        if "resident" in parts:
            result["resident"] = part_resident(tmp)
        if "export" in parts:
            result["export"] = part_export(tmp)
        if "load" in parts:
            result["load"] = part_load(tmp, args.load_layers)
    md = [f"Memory and loading, {result['machine']}, {result['date']}. Random SD3-shaped pairs, fp32, batch {BATCH}, "
          f"latent {LATENT}x{LATENT} (N = {LATENT * LATENT // 4}), {TEXT} text tokens; each measurement in a fresh process.",
          ""]
    if "resident" in result:
        md += ["ONNX Runtime's resident memory (peak RSS: load, full step, masked step, small step) vs the plan's host figure:",
               "", "| large model | weights | process before loading | measured peak | plan | measured / plan |",
               "|---|---|---|---|---|---|"]
        for r in result["resident"]:
            md.append(f"| {r['layers']} x {r['width']} | {r['weights_gb']:.2f} GB | {r['base_gb']:.2f} GB | "
                      f"{r['measured_gb']:.2f} GB | {r['planned_gb']:.2f} GB | {r['measured_over_planned']:.2f} |")
        md.append("")
    if "export" in result:
        e = result["export"]
        md += ["Peak resident memory of the export (limit: 2 x the large weights + 1 GB):", "",
               "| large weights | process before | export peak | limit | within |", "|---|---|---|---|---|"]
        for r in e["rows"]:
            md.append(f"| {r['weights_gb']:.2f} GB | {r['base_gb']:.2f} GB | {r['peak_gb']:.2f} GB | {r['limit_gb']:.2f} GB | "
                      f"{'yes' if r['within_limit'] else 'NO'} |")
        s = e["sd35_large"]
        md += ["", f"Line through the two: peak = {e['intercept_gb']:.2f} GB + {e['slope']:.2f} x weights; SD3.5 Large "
               f"({s['weights_gb']} GB of fp16 weights): {s['predicted_peak_gb']:.1f} GB predicted, limit {s['limit_gb']:.1f} GB.",
               ""]
    if "load" in result:
        lo = result["load"]
        md += [f"Loading a {lo['engine_set_gb']:.2f} GB engine set ({lo['layers']} layers x 2432, random weights):", "",
               "| load | seconds | bytes hashed |", "|---|---|---|"]
        for label, key in (("a copied folder, first load (every file hashed once)", "copied_first"),
                           ("the same folder again (stamps: nothing hashed)", "copied_again"),
                           ("the folder as exported (stat as recorded)", "as_exported")):
            r = lo[key]
            md.append(f"| {label} | {r['load_s']:.2f} | {r['hashed_bytes'] / GB:.2f} GB |")
    text = "\n".join(md)
    print(text)
    write_report(args.out, result, text)
    return result


if __name__ == "__main__":
    main()
