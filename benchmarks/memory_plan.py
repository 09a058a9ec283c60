"""The memory plan of SD3.5 Large + SD3 Medium engine sets (TensorRT, one large engine), at 768^2
and 1024^2, fp16 and bf16, encoders on the GPU or the host, against 48 and 80 GB cards.

Counted on the meta device from the published configs in ``benchmarks/configs`` (no weights):
``hybridstitch-export --large benchmarks/configs/sd3.5-large --small benchmarks/configs/sd3-medium
--backend tensorrt --plan`` prints one of these plans in full.

    python benchmarks/memory_plan.py [--out benchmarks/results/memory_plan]
"""

from __future__ import annotations

import argparse
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "benchmarks", "configs")
DESCRIPTION = "Memory plan of SD3.5 Large + SD3 Medium engine sets at 768/1024, fp16/bf16, against 48 and 80 GB."
CARDS = (24, 48, 80)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=DESCRIPTION)
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "memory_plan"))
    args = ap.parse_args(argv)
    from hybridstitch.bench.report import write_report
    from hybridstitch.export import ExportRequest
    from hybridstitch.export.memory_plan import GB, plan_dict, plan_for_request

    rows = []
    for size in (768, 1024):
        for precision in ("fp16", "bf16"):
            for encoders in ("gpu", "cpu"):
                req = ExportRequest(large=os.path.join(CONFIGS, "sd3.5-large"), small=os.path.join(CONFIGS, "sd3-medium"),
                                    height=size, width=size, batch=2, precision=precision, backend="tensorrt",
                                    opset=22 if precision == "bf16" else 18)
                plan = plan_for_request(req, encoders)
                items = {k: v / GB for k, v in plan.as_bytes().items()}
                rows.append(dict(size=size, precision=precision, encoders=encoders, total_gb=plan.total() / GB,
                                 host_gb=plan.total("cpu") / GB, fits={c: plan.fits(c * GB) for c in CARDS},
                                 items_gb=items, plan=plan_dict(plan)))
    md = ["SD3.5 Large + SD3 Medium, TensorRT engines (one large engine, plugin attention), batch 2 (one image with "
          "guidance); fp16 keeps block 35 in fp32. GB on the GPU (1 GB = 1e9 bytes); counted on the meta device from the "
          "published configs (`python benchmarks/memory_plan.py`).", "",
          "| size | precision | encoders | large | small | KV caches (2 sets) | activations (est.) | encoders + VAE | "
          "runtime | total on GPU | 24 GB | 48 GB | 80 GB |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        i = r["items_gb"]
        enc = sum(i.get(k, 0) for k in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"))
        enc_cell = f"{enc:.2f}" if r["encoders"] == "gpu" else f"({enc:.2f} on host)"
        md.append(f"| {r['size']}² | {r['precision']} | {r['encoders']} | {i['weights_large']:.2f} | {i['weights_small']:.2f} | "
                  f"{i['kv_cache'] + i['kv_cache_spare']:.2f} | {i['activations']:.2f} | {enc_cell} | {i['runtime']:.2f} | "
                  f"**{r['total_gb']:.1f}** | " + " | ".join("fits" if r["fits"][c] else "no" for c in CARDS) + " |")
    text = "\n".join(md)
    print(text)
    write_report(args.out, dict(rows=rows), text)
    return dict(rows=rows)


if __name__ == "__main__":
    main()
