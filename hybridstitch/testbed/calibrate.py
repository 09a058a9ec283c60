"""``hybridstitch calibrate``: the testbed's own thresholds, from a sweep of latency and quality.

The paper's thresholds are tuned to SD3's difference curve; on the testbed pair they fire at
once (DESIGN.md section 2). This command runs every configuration of a grid (HybridStitch
thresholds ``tau_1 > tau_2`` per mask ratio, SRDiffusion thresholds, and the large / small /
T-Stitch baselines) on one prompt set from one fixed noise, and reports for each:

- quality: FD in classifier features against ALL 1,797 real digits (the largest fixed
  reference there is, so the reference adds the least noise), prompt accuracy, and the
  distance to large-only from the same noise (mean L2 of paired classifier features, the
  testbed's LPIPS, and PSNR);
- latency: the latency model (Eqs. 3-8) over per-call medians measured once at the start,
  interleaved, at the sweep's batch size, applied to what each run actually ran (its trace);
  the measured wall time is reported beside it, but it moves with the load of a shared
  machine, so the model is what configurations are ranked by.

It writes JSON, Markdown and a scatter plot with the Pareto fronts (modelled latency vs FD,
and vs distance to large), and the presets the selection rule picks (:func:`choose_presets`);
the rendering is in :mod:`hybridstitch.testbed.calibration_report`.

    hybridstitch calibrate --out benchmarks/results/calibration
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field, fields

import torch

from hybridstitch.config import StitchConfig
from hybridstitch.errors import HybridStitchError
from hybridstitch.latency_model import CallLatencies, predict_from_trace

# Read by argparse; a constant, not the module docstring, so ``python -OO`` (no docstrings) works.
DESCRIPTION = "hybridstitch calibrate: the testbed's own thresholds, from a sweep of latency and quality."

DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4)
# On the testbed (20 steps, guidance 1.25) d_i is ~0.15 at steps 1-2 and 0.015-0.035 after
# step 3 while the large model runs alone, so tau_1 > 0.155 leaves the large stage after step
# 1 and tau_1 in (0.025, 0.145) after step 3. Once the small model runs, the stitched x0
# estimate moves more: d_i stays at 0.04-0.15 through the masked stage (0.02-0.03 small only),
# so tau_2 must lie in that range for the masked stage to end before the last step.
DEFAULT_THRESHOLDS_1 = (0.2, 0.05)
DEFAULT_THRESHOLDS_2 = (0.14, 0.1, 0.07, 0.045)
DEFAULT_SRDIFFUSION = (0.003, 0.008, 0.015)
DEFAULT_SAMPLES = 80
DEFAULT_OUT = os.path.join("benchmarks", "results", "calibration")


# -- sampling --------------------------------------------------------------------------


def load_testbed_pipeline():
    """The shipped testbed pair in a :class:`~hybridstitch.pipeline.HybridStitchPipeline` (torch, CPU)."""
    from hybridstitch.pipeline import HybridStitchPipeline
    from hybridstitch.testbed import LARGE_DIR as large
    from hybridstitch.testbed import SMALL_DIR as small

    if not os.path.isfile(os.path.join(large, "transformer", "config.json")):
        raise HybridStitchError(f"no testbed weights in {large}; train them with python -m hybridstitch.testbed.train")
    return HybridStitchPipeline.from_pretrained(large=large, small=small)


def balanced_labels(n: int) -> list[int]:
    """``n`` prompts' digits, cycling 0..9 (equal counts when 10 divides ``n``)."""
    return [i % 10 for i in range(n)]


def initial_noise(n: int, seed: int, size: int = 32) -> torch.Tensor:
    """The fixed starting noise ``[n, 1, size, size]`` every method of a seed shares."""
    return torch.randn((n, 1, size, size), generator=torch.Generator().manual_seed(seed))


@dataclass
class SampleRun:
    images: torch.Tensor  # [N, 1, 32, 32], clamped to [-1, 1]
    traces: list = field(default_factory=list)  # one Trace per chunk
    wall_seconds: float = 0.0


def sample(pipe, config: StitchConfig, labels, noise, steps: int, guidance_scale: float, batch_size: int) -> SampleRun:
    """Sample ``len(labels)`` images from ``noise`` in chunks of ``batch_size`` prompts: every image
    with its own stages (the chunks only share engine calls). One trace per image."""
    from hybridstitch.testbed.data import prompt_for

    size = noise.shape[-1]
    out, traces = [], []
    wall = 0.0
    for start in range(0, len(labels), batch_size):
        chunk = labels[start:start + batch_size]
        t0 = time.perf_counter()
        res = pipe(prompt=[prompt_for(c) for c in chunk], config=config, num_inference_steps=steps,
                   guidance_scale=guidance_scale, height=size, width=size, latents=noise[start:start + len(chunk)],
                   progress=False, output_type="latent")
        wall += time.perf_counter() - t0
        out.append(res.images.float().clamp(-1.0, 1.0).cpu())
        traces.extend(res.traces)
    return SampleRun(torch.cat(out), traces, wall)


@torch.no_grad()
def measure_call_latencies(pipe, batch: int, ratios, guidance_scale: float = 1.25, rounds: int = 5,
                           size: int = 32) -> CallLatencies:
    """Median seconds per model call at ``batch`` prompts (CFG doubles it), interleaved.

    Each round times one full large call, one small call and one masked large call per ratio,
    in turn (:class:`~hybridstitch.bench.timer.InterleavedTimer`), so slow phases of a shared
    machine hit every kind alike. The masked calls read caches made by a full large call, as in a run.
    """
    from hybridstitch.bench.timer import InterleavedTimer
    from hybridstitch.testbed.data import prompt_for

    do_cfg = guidance_scale > 1.0
    prompts = [prompt_for(c) for c in balanced_labels(batch)]
    cond = pipe.conditioner.encode(prompts, [""] * batch, do_cfg, pipe.device)
    b = batch * (2 if do_cfg else 1)
    latents = torch.randn((b, pipe.large.spec.in_channels, size, size), generator=torch.Generator().manual_seed(0))
    timestep = torch.full((b,), 500.0)
    args = (latents, cond.prompt_embeds, cond.pooled, timestep)
    p = pipe.large.spec.patch_size
    num_tokens = (size // p) * (size // p)
    _, caches = pipe.large.forward_store(*args)
    gen = torch.Generator().manual_seed(1)
    timer = InterleavedTimer(reps=rounds, warmup=1)
    timer.add("large", lambda: pipe.large.forward_store(*args))
    timer.add("small", lambda: pipe.small.forward(*args))
    for r in dict.fromkeys(ratios):  # each ratio once, in the order given
        k = pipe.large.bucket_for(r, num_tokens).masked_tokens
        idx = torch.stack([torch.randperm(num_tokens, generator=gen)[:k].sort().values for _ in range(batch)])  # [B, k]
        index = torch.cat([idx, idx]) if do_cfg else idx  # one mask for both CFG halves
        timer.add(r, lambda index=index: pipe.large.forward_masked(*args, index, caches))
    t = timer.run()
    med = statistics.median
    return CallLatencies(med(t["large"].seconds), med(t["small"].seconds), {r: med(t[r].seconds) for r in ratios})


def modelled_seconds(traces, latencies: CallLatencies, batch: int) -> float:
    """Eqs. 3-8 over a run's images. Each image's trace lists the calls it took part in, priced at the
    measured call costs of ``batch`` images; an image's share of a call is 1/``batch`` of it (call
    cost grows about linearly with the batch on CPU), so the sum is the run's modelled time."""
    return sum(predict_from_trace(t, latencies, by="mask_ratio").total_seconds for t in traces) / batch


def mean_switch_steps(traces) -> list[float]:
    """Element-wise mean of the images' switch steps (a stage an image never reached counts as T)."""
    if not traces:
        return []
    width = max(len(t.switch_steps) for t in traces)
    cols = [[(t.switch_steps[j] if j < len(t.switch_steps) else t.num_steps) for t in traces] for j in range(width)]
    return [sum(c) / len(c) for c in cols]


def mean_differences(traces) -> list[float | None]:
    """Per step, the chunks' mean difference d_i (Eq. 9); None on the first step."""
    out = []
    for i in range(traces[0].num_steps):
        ds = [t.steps[i].d for t in traces if t.steps[i].d is not None]
        out.append(sum(ds) / len(ds) if ds else None)
    return out


def mean_stage_counts(traces) -> dict[str, float]:
    out: dict[str, float] = {}
    for t in traces:
        for k, v in t.stage_counts.items():
            out[k] = out.get(k, 0.0) + v / len(traces)
    return out


# -- quality ---------------------------------------------------------------------------


class QualityReference:
    """The classifier and the real reference features (all 1,797 digits), loaded once."""

    def __init__(self):
        from hybridstitch.testbed.classifier import load_classifier
        from hybridstitch.testbed.data import load_split
        from hybridstitch.testbed.quality import classifier_features

        self.classifier = load_classifier()
        real, _ = load_split("all")
        self.num_real = real.shape[0]
        self.real_features = classifier_features(real, self.classifier)  # [1797, F]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        from hybridstitch.testbed.quality import classifier_features

        return classifier_features(images, self.classifier)

    def evaluate(self, images, labels, large_images=None, large_features=None) -> dict:
        """FD vs the real digits, prompt accuracy, and (given the large-only samples from the same
        noise) feature distance and PSNR to them."""
        from hybridstitch.testbed.quality import frechet_distance, prompt_accuracy, psnr

        feats = self.features(images)
        out = {
            "fd": frechet_distance(feats, self.real_features),
            "accuracy": prompt_accuracy(images, labels, self.classifier),
        }
        if large_images is not None:
            if large_features is None:
                large_features = self.features(large_images)
            out["feature_distance"] = float((feats - large_features).norm(dim=1).mean())
            out["psnr"] = psnr(images, large_images)
        return out


# -- the sweep -------------------------------------------------------------------------


def sweep_configs(ratios, thresholds_1, thresholds_2, srdiffusion) -> list[StitchConfig]:
    """Baselines, SRDiffusion thresholds, and HybridStitch (tau_1 > tau_2) per mask ratio."""
    configs = [StitchConfig.preset("large"), StitchConfig.preset("small"), StitchConfig.preset("t-stitch")]
    for s in srdiffusion:
        configs.append(StitchConfig(method="srdiffusion", mask_ratios=(), thresholds=(), srdiffusion_threshold=s,
                                    name=f"srdiffusion@{s:g}"))
    for r in ratios:
        for t1 in thresholds_1:
            for t2 in thresholds_2:
                if t1 > t2:
                    configs.append(StitchConfig(mask_ratios=(r,), thresholds=(t1, t2), name=f"hs-{round(r * 100)}@{t1:g},{t2:g}"))
    return configs


def pareto_front(points) -> list[int]:
    """Indices of the points ``(x, y)`` no other point beats in both (lower is better), sorted by x."""
    idx = []
    for i, (x, y) in enumerate(points):
        if not any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for j, (x2, y2) in enumerate(points) if j != i):
            idx.append(i)
    return sorted(idx, key=lambda i: points[i][0])


# The selection rule in words, as the report prints it (a constant: docstrings are gone under -OO).
SELECTION_RULE = (
    "a configuration is acceptable when its prompt accuracy is at most ``max_accuracy_drop`` below "
    "large-only's and its distance to large-only (paired classifier features) is at most "
    "``max_distance_fraction`` of small-only's; per mask ratio the preset is the acceptable configuration "
    "with the lowest modelled latency (ties: lower distance); with none acceptable, the one with the lowest "
    "distance. SRDiffusion: the same rule over its thresholds. FD is reported but not ranked on: at a "
    "sweep's sample size it moves by more than the differences between neighbouring configurations."
)


def rule_text() -> str:
    """The selection rule in one paragraph (:data:`SELECTION_RULE`)."""
    return SELECTION_RULE


def acceptable(row: dict, large: dict, small: dict, max_accuracy_drop: float, max_distance_fraction: float) -> bool:
    """The quality bar of the selection rule (see :func:`choose_presets`)."""
    return (row["accuracy"] >= large["accuracy"] - max_accuracy_drop
            and row["feature_distance"] <= max_distance_fraction * small["feature_distance"])


def choose_presets(rows: list[dict], thresholds_2, max_accuracy_drop: float = 0.02,
                   max_distance_fraction: float = 0.5) -> dict[str, dict]:
    """The testbed presets from a sweep, the way the paper balanced quality and speed.

    Rule: :data:`SELECTION_RULE` (the report prints it).

    Derived presets (the paper's ablations reuse its 30 % thresholds): ``testbed-30-static`` and
    ``testbed-30-fulllarge`` take testbed-30's; multi-mask ``r1-r2`` takes testbed-r1's
    ``(tau_1, tau_2)`` and, for its second masked stage, the next lower swept ``tau_2`` (else
    ``0.8 tau_2``) as ``tau_3``.
    """
    by_name = {r["name"]: r for r in rows}
    large, small = by_name["large"], by_name["small"]

    def pick(cands):
        if not cands:
            return None
        ok = [r for r in cands if acceptable(r, large, small, max_accuracy_drop, max_distance_fraction)]
        if ok:
            return min(ok, key=lambda r: (r["modelled_seconds_per_image"], r["feature_distance"]))
        return min(cands, key=lambda r: r["feature_distance"])

    presets: dict[str, dict] = {}
    chosen: dict[float, tuple] = {}
    ratios = sorted({r["mask_ratios"][0] for r in rows if r["method"] == "hybridstitch"})
    for ratio in ratios:
        best = pick([r for r in rows if r["method"] == "hybridstitch" and r["mask_ratios"] == [ratio]])
        chosen[ratio] = tuple(best["thresholds"])
        presets[f"testbed-{round(ratio * 100)}"] = dict(mask_ratios=(ratio,), thresholds=chosen[ratio], source=best["name"])
    srd = pick([r for r in rows if r["method"] == "srdiffusion"])
    if srd is not None:
        presets["testbed-srdiffusion"] = dict(method="srdiffusion", mask_ratios=(), thresholds=(),
                                              srdiffusion_threshold=srd["srdiffusion_threshold"], source=srd["name"])

    def lower(t2):
        below = sorted((t for t in thresholds_2 if t < t2), reverse=True)
        return below[0] if below else round(0.8 * t2, 6)

    if 0.3 in chosen:
        presets["testbed-30-static"] = dict(mask_ratios=(0.3,), thresholds=chosen[0.3], mask_mode="static", source="testbed-30")
        presets["testbed-30-fulllarge"] = dict(mask_ratios=(0.3,), thresholds=chosen[0.3], stage2_large="full", source="testbed-30")
    for r1, r2 in ((0.2, 0.1), (0.3, 0.1), (0.4, 0.3)):
        if r1 in chosen:
            t1, t2 = chosen[r1]
            presets[f"testbed-{round(r1 * 100)}-{round(r2 * 100)}"] = dict(
                mask_ratios=(r1, r2), thresholds=(t1, t2, lower(t2)), source=f"testbed-{round(r1 * 100)}")
    for name, kw in presets.items():  # every preset must be a valid config
        StitchConfig(**{k: v for k, v in kw.items() if k != "source"})
    return presets


# -- command ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrationSettings:
    """One calibration sweep (the command line, typed at the edge by :func:`settings_from_args`)."""

    ratios: tuple[float, ...] = DEFAULT_RATIOS
    thresholds_1: tuple[float, ...] = DEFAULT_THRESHOLDS_1  # tau_1: leave the large stage
    thresholds_2: tuple[float, ...] = DEFAULT_THRESHOLDS_2  # tau_2: leave the masked stage
    srdiffusion: tuple[float, ...] = DEFAULT_SRDIFFUSION
    samples: int = DEFAULT_SAMPLES  # per configuration, digits cycling 0-9
    batch_size: int | None = None  # prompts per pipeline call (None: all samples)
    steps: int = 20
    guidance_scale: float = 1.25
    seed: int = 0
    threads: int = 1
    latency_rounds: int = 5
    max_accuracy_drop: float = 0.02
    max_distance_fraction: float = 0.5
    out: str = DEFAULT_OUT

    def __post_init__(self) -> None:
        from hybridstitch import checks

        # Every setting is checked here, before the sweep's hour of work (argparse only parses numbers).
        if checks.integer("--samples", self.samples) < 2:
            raise HybridStitchError(f"--samples must be >= 2 (FD needs two samples), got {self.samples}")
        checks.integer("--latency-rounds", self.latency_rounds, minimum=1)
        checks.integer("--threads", self.threads, minimum=1)
        checks.integer("--steps", self.steps, minimum=1)
        checks.integer("--seed", self.seed, minimum=0, maximum=2**64 - 1)
        if self.batch_size is not None:
            checks.integer("--batch-size", self.batch_size, minimum=1)
        checks.real("--guidance-scale", self.guidance_scale)
        for name in ("max_accuracy_drop", "max_distance_fraction"):
            if checks.real(f"--{name.replace('_', '-')}", getattr(self, name)) < 0:
                raise HybridStitchError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("ratios", "thresholds_1", "thresholds_2", "srdiffusion"):
            flag = f"--{name.replace('_', '-')}"
            values = getattr(self, name)
            if not values:
                raise HybridStitchError(f"{flag} needs at least one value")
            for v in values:
                checks.real(flag, v)
        if any(not 0 < r <= 1 for r in self.ratios):
            raise HybridStitchError(f"--ratios are mask ratios in (0, 1], got {','.join(f'{r:g}' for r in self.ratios)}")

    @property
    def batch(self) -> int:
        return self.batch_size or self.samples


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ratios", type=_floats, default=DEFAULT_RATIOS, help="mask ratios, comma-separated")
    parser.add_argument("--thresholds-1", type=_floats, default=DEFAULT_THRESHOLDS_1, help="tau_1 values (leave the large stage)")
    parser.add_argument("--thresholds-2", type=_floats, default=DEFAULT_THRESHOLDS_2, help="tau_2 values (leave the masked stage)")
    parser.add_argument("--srdiffusion", type=_floats, default=DEFAULT_SRDIFFUSION, help="SRDiffusion thresholds")
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help="samples per configuration (digits cycle 0-9)")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per pipeline call (default: all samples)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, default=1.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--latency-rounds", type=int, default=5, help="interleaved rounds of per-call timing")
    parser.add_argument("--max-accuracy-drop", type=float, default=0.02,
                        help="selection rule: accuracy at most this far below large-only's (fraction)")
    parser.add_argument("--max-distance-fraction", type=float, default=0.5,
                        help="selection rule: distance to large at most this fraction of small-only's")
    parser.add_argument("--out", default=DEFAULT_OUT, help="output folder (calibration.json, .md, .png)")


def settings_from_args(args: argparse.Namespace) -> CalibrationSettings:
    """The parsed command line as typed settings (the only place that reads the ``Namespace``)."""
    return CalibrationSettings(**{f.name: getattr(args, f.name) for f in fields(CalibrationSettings)})


def run(settings: CalibrationSettings) -> dict:
    from hybridstitch.bench.machine import describe_machine, machine_info
    from hybridstitch.bench.report import write_report

    from .calibration_report import presets_source, render_markdown, scatter_png

    from hybridstitch.outputs import check_output_folder

    s = settings
    check_output_folder(s.out, "--out")  # before the sweep's hour of work, not after it
    torch.set_num_threads(s.threads)
    t_start = time.perf_counter()
    pipe = load_testbed_pipeline()
    ref = QualityReference()
    batch = s.batch
    labels = balanced_labels(s.samples)
    noise = initial_noise(s.samples, s.seed)
    ratios = tuple(s.ratios)
    print(f"calibrate: {s.samples} samples, {s.steps} steps, guidance {s.guidance_scale}, batch {batch}, "
          f"{s.threads} thread(s)", flush=True)
    lat = measure_call_latencies(pipe, batch, ratios, s.guidance_scale, rounds=s.latency_rounds)
    print("per-call medians (s): " + json.dumps(lat.to_dict()), flush=True)
    configs = sweep_configs(ratios, s.thresholds_1, s.thresholds_2, s.srdiffusion)
    rows, large_images, large_feats = [], None, None
    chunks = math.ceil(s.samples / batch)
    large_modelled = lat.large * s.steps * chunks
    for cfg in configs:
        run_ = sample(pipe, cfg, labels, noise, s.steps, s.guidance_scale, batch)
        if cfg.name == "large":
            large_images, large_feats = run_.images, ref.features(run_.images)
        q = ref.evaluate(run_.images, labels, large_images, large_feats)
        modelled = modelled_seconds(run_.traces, lat, batch)
        row = dict(name=cfg.name, method=cfg.method, mask_ratios=list(cfg.mask_ratios), thresholds=list(cfg.thresholds),
                   srdiffusion_threshold=cfg.srdiffusion_threshold, config=cfg.to_dict(),
                   mean_switch_steps=mean_switch_steps(run_.traces), stage_counts=mean_stage_counts(run_.traces),
                   mean_d=mean_differences(run_.traces),
                   modelled_seconds=modelled, modelled_seconds_per_image=modelled / s.samples,
                   modelled_speedup=large_modelled / modelled, wall_seconds=run_.wall_seconds, **q)
        rows.append(row)
        print(f"  {cfg.name:<24} switch {row['mean_switch_steps']} speed-up {row['modelled_speedup']:.2f}x "
              f"FD {q['fd']:.1f} acc {q['accuracy']:.3f} dist {q['feature_distance']:.2f} psnr {q['psnr']:.1f} "
              f"wall {run_.wall_seconds:.1f}s", flush=True)
    for key, front_key in (("fd", "front_fd"), ("feature_distance", "front_distance")):
        for i in pareto_front([(r["modelled_seconds"], r[key]) for r in rows]):
            rows[i][front_key] = True
    presets = choose_presets(rows, s.thresholds_2, s.max_accuracy_drop, s.max_distance_fraction)
    command = "hybridstitch calibrate " + " ".join(sys.argv[2:]) if len(sys.argv) > 1 and sys.argv[1] == "calibrate" else " ".join(sys.argv)
    result = dict(
        date=datetime.date.today().isoformat(), machine=describe_machine(machine_info(s.threads)), command=command,
        settings=dict(samples=s.samples, batch_size=batch, steps=s.steps, guidance_scale=s.guidance_scale,
                      seed=s.seed, ratios=list(ratios), thresholds_1=list(s.thresholds_1),
                      thresholds_2=list(s.thresholds_2), srdiffusion=list(s.srdiffusion)),
        fd_reference=f"all {ref.num_real} real digits (train + held-out), classifier features",
        per_call_seconds=lat.to_dict(),
        rule=dict(max_accuracy_drop=s.max_accuracy_drop, max_distance_fraction=s.max_distance_fraction,
                  text=rule_text()),
        rows=rows, presets={k: {kk: (list(vv) if isinstance(vv, tuple) else vv) for kk, vv in v.items()} for k, v in presets.items()},
        seconds=time.perf_counter() - t_start,
    )
    write_report(os.path.join(s.out, "calibration"), result, render_markdown(result, presets), scatter_png(rows, presets))
    print("\nchosen presets:\n" + presets_source(presets))
    print(f"wrote {s.out}/calibration.{{json,md,png}} in {result['seconds']:.0f} s")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="hybridstitch calibrate", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(settings_from_args(args))
    except HybridStitchError as e:
        print(f"hybridstitch calibrate: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
