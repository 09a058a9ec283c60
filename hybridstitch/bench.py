"""Latency benchmark: every method on every available backend, against the PyTorch baselines.

Two workloads:

* ``testbed``: the shipped trained pair (``hybridstitch/testbed/weights``) through the real
  pipeline, so the switching decisions are the method's own.
* ``synthetic``: SD3.5 Large / SD3 Medium-shaped transformers with random weights at a
  CPU-feasible width, with a *replayed* schedule: the switch steps are given (``--switch-steps
  10 30``: large until step 10, masked until step 30, small after), not decided from ``d_i``.
  Depth is real (38 vs 24 layers); width, image tokens and text tokens are divided by
  ``--synthetic-scale`` together, so the image : text token ratio (2304 : 333 at 768x768) and
  the attention : projection cost ratio stay those of the real models.

Backends: ``eager`` (diffusers modules, the PyTorch baseline), ``compile`` (the same modules under
``torch.compile``), ``onnxruntime`` (exported engines via ``HybridStitchPipeline.from_engines``),
``tensorrt`` (when present). One that cannot run here is reported ``n/a`` with the reason.

Timing: one thread, ``time.perf_counter``, a warm-up run of every method, then ``--reps``
interleaved repetitions (rep 1: every backend and method, rep 2: ...); medians and min-max;
speed-ups over large-only on the same backend. Beside each measured latency: the paper's
latency model (Eqs. 3-8, :mod:`hybridstitch.latency_model`) from the per-call latencies
t_l, t_s and t_l(r) measured in the same runs, and the mask-ratio bound per bucket.

    python benchmarks/latency.py                  # or: hybridstitch bench
    python benchmarks/latency.py --workloads synthetic --switch-steps 8 20

Writes ``<out-dir>/<name>.json``, ``.md`` and ``.png`` (speed-up per method per backend).
This module imports no backend at import time; :func:`add_arguments` + :func:`run` plug into
a CLI.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from .config import PRESETS, StitchConfig
from .errors import HybridStitchError
from .fileio import atomic_write_bytes, atomic_write_text
from .latency_model import (
    CallLatencies,
    LatencyBoundWarning,
    break_even_ratio,
    mask_ratio_bound,
    per_call_samples,
    predict_from_trace,
    ratio_key,
)
from .policy import LARGE, Stage, tstitch_first_large_step

DEFAULT_METHODS = (
    "large",
    "small",
    "t-stitch",
    "srdiffusion",
    "hybridstitch-10",
    "hybridstitch-20",
    "hybridstitch-30",
    "hybridstitch-40",
    "hybridstitch-30-static",
    "hybridstitch-30-fulllarge",
    "hybridstitch-30-10",
)
BACKENDS = ("eager", "compile", "onnxruntime", "tensorrt")
WORKLOADS = ("testbed", "synthetic")

# The real models (DESIGN.md section 3): SD3.5 Large and SD3 Medium at 768x768.
REAL_LAYERS = (38, 24)
REAL_WIDTHS = (38 * 64, 24 * 64)  # 2432, 1536
REAL_IMAGE_TOKENS = 2304  # 96x96 latent, patch 2
REAL_TEXT_TOKENS = 333  # 77 CLIP + 256 T5
REAL_JOINT_DIM, REAL_POOLED_DIM = 4096, 2048


class BackendUnavailable(Exception):
    """A backend that cannot run here; the message is the reason shown in the table."""


# -- replayed schedules --------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplaySwitches:
    """Given switch steps (0-based first step of each later stage), independent of ``d_i``.

    ``stitch``: ``(s_1, s_last)``: large before ``s_1``, masked stage(s) until ``s_last``, small
    after; several mask ratios split ``[s_1, s_last)`` evenly unless ``multi`` gives all
    ``n + 1`` switch steps. ``tstitch``: T-Stitch's first large step (small before it).
    ``srdiffusion``: SRDiffusion's first small step (large before it).
    """

    stitch: tuple[int, int]
    tstitch: int
    srdiffusion: int
    multi: tuple[int, ...] | None = None

    @classmethod
    def default(cls, num_steps: int) -> "ReplaySwitches":
        """Paper-like defaults: large for 30 % of the steps, masked to 70 %; T-Stitch 40 % small
        (its preset); SRDiffusion large for the first half."""
        return cls(
            stitch=(max(2, round(0.3 * num_steps)), max(2, round(0.7 * num_steps))),
            tstitch=tstitch_first_large_step(num_steps, PRESETS["t-stitch"]["tstitch_small_fraction"]),
            srdiffusion=round(0.5 * num_steps),
        )

    def for_config(self, config: StitchConfig, num_steps: int) -> list[int]:
        """The switch steps of ``config``'s stages, ``len(mask_ratios) + 1`` for HybridStitch."""
        if config.method in ("large", "small"):
            return []
        if config.method == "t-stitch":
            return [self.tstitch]
        if config.method == "srdiffusion":
            return [self.srdiffusion]
        n = len(config.mask_ratios)
        if n > 1 and self.multi is not None:
            if len(self.multi) != n + 1:
                raise HybridStitchError(
                    f"{config.name} has {n} mask ratios and needs {n + 1} switch steps, got --multi-switch-steps {list(self.multi)}"
                )
            return list(self.multi)
        s1, last = self.stitch
        return [s1 + round(j * (last - s1) / n) for j in range(n)] + [last]


def replay_stages(config: StitchConfig, num_steps: int, switches: ReplaySwitches) -> list[Stage]:
    """The stage of every step of ``config`` under the replayed switch steps."""
    s = switches.for_config(config, num_steps)
    if any(a > b for a, b in zip(s, s[1:])) or any(not 0 <= x <= num_steps for x in s):
        raise HybridStitchError(f"{config.name}: switch steps must be non-decreasing within 0..{num_steps}, got {s}")
    if config.method == "large":
        return [LARGE] * num_steps
    if config.method == "small":
        return [Stage(1, "small")] * num_steps
    if config.method == "t-stitch":
        return [Stage(1, "small") if i < s[0] else Stage(2, "large") for i in range(num_steps)]
    if config.method == "srdiffusion":
        return [LARGE if i < s[0] else Stage(2, "small") for i in range(num_steps)]
    if s[0] < 2 and s[0] < s[-1]:
        raise HybridStitchError(
            f"{config.name}: the first masked step must be >= 2 (a mask needs two earlier x0 estimates), got switch steps {s}"
        )
    stages = []
    for i in range(num_steps):
        j = sum(1 for x in s if x <= i)  # stages entered so far
        if j == 0:
            stages.append(LARGE)
        elif j <= len(config.mask_ratios):
            stages.append(Stage(1 + j, "masked", config.mask_ratios[j - 1]))
        else:
            stages.append(Stage(2 + len(config.mask_ratios), "small"))
    return stages


def replay_denoise(large, small, scheduler, latents, cond, config: StitchConfig, stages: list[Stage],
                   guidance_scale: float, device=None):
    """The pipeline's denoising loop with given stages (:meth:`HybridStitchPipeline.denoise` with a
    ``schedule``), on denoisers built outside a pipeline. ``latents`` [B, C, h, w]; ``cond``:
    :class:`~hybridstitch.conditioning.Conditioning`, CFG-batched when guidance is on.
    Returns ``(latents, trace)`` with ``trace.total_seconds`` the whole call.
    """
    from .pipeline import HybridStitchPipeline

    pipe = HybridStitchPipeline(large, small, scheduler, device=device or latents.device)
    return pipe.denoise(latents, cond, config, len(stages), guidance_scale, schedule=stages)


# -- backends --------------------------------------------------------------------------------------


def _compiled_denoiser(model, name: str):
    """A :class:`TorchDenoiser` whose full forward (``model.compile()``, in place) and masked
    forward (``torch.compile`` of the same function) run compiled graphs."""
    import torch

    from hybridstitch.engine.torch_backend import TorchDenoiser, masked_transformer_forward

    class CompiledTorchDenoiser(TorchDenoiser):
        backend = "torch-compile"

        def __init__(self, model, name):
            super().__init__(model, name)
            self.model.compile()
            self._masked = torch.compile(masked_transformer_forward)

        @torch.no_grad()
        def forward_masked(self, latents, prompt_embeds, pooled, timestep, index, cache):
            if not cache.filled:
                raise RuntimeError("masked forward before any full forward filled the KV cache")
            dt = self.dtype
            return self._masked(self.model, latents.to(dt), prompt_embeds.to(dt), pooled.to(dt), timestep, index, cache)

    return CompiledTorchDenoiser(model, name)


def _check_compile() -> None:
    import shutil

    if not any(shutil.which(c) for c in ("cc", "gcc", "clang", "g++")):
        raise BackendUnavailable("torch.compile's CPU backend needs a C++ compiler; none on PATH")


def _check_tensorrt() -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise BackendUnavailable("TensorRT is not installed (pip install -e '.[gpu]' on an NVIDIA GPU machine)") from None
    raise BackendUnavailable("TensorRT engines are not runnable through HybridStitchPipeline.from_engines in this build")


def _onnx_pipeline(large_dir: str, small_dir: str, engine_dir: str, *, height: int, width: int, batch: int,
                   buckets, text_tokens: int | None, threads: int, vae_scale_factor: int | None = None):
    """Export (or reuse) ONNX Runtime engines of a pair and load them as a pipeline."""
    try:
        from hybridstitch.export import onnx_export as ox
    except ImportError as e:
        raise BackendUnavailable(f"the ONNX export is not available: {e}") from None
    from .pipeline import HybridStitchPipeline

    if not hasattr(HybridStitchPipeline, "from_engines"):
        raise BackendUnavailable("HybridStitchPipeline.from_engines is not available in this build")
    # overwrite: the cache folder is ours; engines of another configuration in it are rebuilt, matching ones reused
    req = ox.ExportRequest(large=large_dir, small=small_dir, height=height, width=width, batch=batch,
                           buckets=tuple(buckets), text_tokens=text_tokens, vae_scale_factor=vae_scale_factor,
                           overwrite=True)
    ox.export_engines(req, engine_dir, progress=False)
    return HybridStitchPipeline.from_engines(engine_dir, num_threads=threads)


# -- workloads ---------------------------------------------------------------------------------------


Runner = Callable[[StitchConfig, bool], Any]  # (config, warmup) -> Trace with total_seconds = e2e


class TestbedWorkload:
    """The trained pair through the real pipeline: stage decisions come from ``d_i``."""

    __test__ = False
    name = "testbed"

    def __init__(self, args):
        from . import testbed

        self.args = args
        self.large_dir = args.testbed_large or testbed.LARGE_DIR
        self.small_dir = args.testbed_small or testbed.SMALL_DIR
        for d in (self.large_dir, self.small_dir):
            if not os.path.isdir(d):
                raise BackendUnavailable(
                    f"testbed weights not found at {d}; train them with `python -m hybridstitch.testbed.train` "
                    "or pass --testbed-large/--testbed-small"
                )
        # The calibrated testbed-* presets fit the shipped pair only; other folders keep the names given.
        shipped = not (args.testbed_large or args.testbed_small)
        self.methods = [testbed_preset(m) if shipped else m for m in args.methods]
        self._eager = self._load()
        p = self._eager
        size = args.testbed_size or (p.default_sample_size or 128) * p.vae_scale_factor
        self.height = self.width = size
        spec = p.large.spec
        self.text_inputs = None
        if p.conditioner is None:  # transformer-only folders: random text embeddings of the pair's widths
            import torch

            g = torch.Generator().manual_seed(args.seed)
            t = args.testbed_text_tokens
            self.text_inputs = dict(
                prompt_embeds=torch.randn(1, t, spec.joint_attention_dim, generator=g),
                pooled_prompt_embeds=torch.randn(1, spec.pooled_projection_dim, generator=g),
                negative_prompt_embeds=torch.randn(1, t, spec.joint_attention_dim, generator=g),
                negative_pooled_prompt_embeds=torch.randn(1, spec.pooled_projection_dim, generator=g),
            )
        self.description = {
            "what": "shipped trained testbed pair through the real pipeline (switching decided from d_i)",
            "large": self.large_dir,
            "small": self.small_dir,
            "large_shape": _shape(spec),
            "small_shape": _shape(p.small.spec),
            "height": size,
            "width": size,
            "image_tokens": (size // p.vae_scale_factor // spec.patch_size) ** 2,
            "steps": args.testbed_steps,
            "guidance_scale": args.guidance_scale,
            "prompt": None if self.text_inputs else args.prompt,
            "cfg_batch": 2 if args.guidance_scale > 1 else 1,
        }

    def _load(self):
        from .pipeline import HybridStitchPipeline

        return HybridStitchPipeline.from_pretrained(large=self.large_dir, small=self.small_dir)

    def runner(self, backend: str) -> Runner:
        if backend == "eager":
            pipe = self._eager
        elif backend == "compile":
            _check_compile()
            pipe = self._load()
            pipe.large = _compiled_denoiser(pipe.large.model, "large")
            pipe.small = _compiled_denoiser(pipe.small.model, "small")
        elif backend == "onnxruntime":
            buckets = sorted({ratio_key(r) for m in self.methods for r in StitchConfig.preset(m).mask_ratios}) or [0.3]
            pipe = _onnx_pipeline(
                self.large_dir, self.small_dir,
                os.path.join(self.args.engine_cache, f"testbed-{self.height}px-b{self.description['cfg_batch']}"),
                height=self.height, width=self.width, batch=self.description["cfg_batch"], buckets=buckets,
                text_tokens=self.args.testbed_text_tokens if self.text_inputs else None, threads=self.args.threads,
            )
        elif backend == "tensorrt":
            _check_tensorrt()
        else:
            raise BackendUnavailable(f"unknown backend {backend!r}")
        return lambda config, warmup: self._run(pipe, config)

    def _run(self, pipe, config: StitchConfig):
        import torch

        kwargs = dict(config=config, num_inference_steps=self.args.testbed_steps, guidance_scale=self.args.guidance_scale,
                      height=self.height, width=self.width, generator=torch.Generator().manual_seed(self.args.seed),
                      output_type="latent", progress=False)
        if self.text_inputs is not None:
            kwargs.update(self.text_inputs)
        else:
            kwargs["prompt"] = self.args.prompt
        t0 = time.perf_counter()
        out = pipe(**kwargs)
        out.trace.total_seconds = time.perf_counter() - t0  # the caller's view, prompt encoding included
        return out.trace


def testbed_preset(name: str) -> str:
    """A calibrated ``testbed-*`` preset stands in for ``hybridstitch-*`` on the testbed when it exists."""
    if name.startswith("hybridstitch-"):
        alt = "testbed-" + name[len("hybridstitch-"):]
        if alt in PRESETS:
            return alt
    return name


def _shape(spec) -> str:
    return f"{spec.num_layers} layers x {spec.num_heads} heads x {spec.head_dim} (qk_norm {spec.qk_norm})"


def synthetic_shapes(scale: float, layers=REAL_LAYERS, heads=(19, 12)) -> dict:
    """SD3.5 Large / SD3 Medium shapes with width, image tokens and text tokens divided by ``scale``.

    Real: 38 x 2432 and 24 x 1536 wide, 2304 image + 333 text tokens. Heads default to half the
    real count with head dim ``128 / scale`` (a multiple of 4: diffusers' sincos position embedding
    needs a width divisible by 4).
    """
    side = max(2, round(48 / math.sqrt(scale)))  # tokens per side (48 at 768x768)
    head_dim = max(4, 4 * round(32 / scale))
    return {
        "scale": scale,
        "large": dict(num_layers=layers[0], num_attention_heads=heads[0], attention_head_dim=head_dim, qk_norm="rms_norm"),
        "small": dict(num_layers=layers[1], num_attention_heads=heads[1], attention_head_dim=head_dim, qk_norm=None),
        "latent_side": 2 * side,
        "image_tokens": side * side,
        "text_tokens": max(1, round(REAL_TEXT_TOKENS / scale)),
        "joint_attention_dim": max(8, 2 * round(REAL_JOINT_DIM / scale / 2)),
        "pooled_projection_dim": max(8, 2 * round(REAL_POOLED_DIM / scale / 2)),
    }


def flop_ratios(image_tokens: int = REAL_IMAGE_TOKENS, text_tokens: int = REAL_TEXT_TOKENS, layers=REAL_LAYERS,
                widths=REAL_WIDTHS, buckets=(0.1, 0.2, 0.3, 0.4)) -> dict:
    """What t_s/t_l and t_l(r)/t_l would be if time were FLOPs (projections, MLP and attention).

    Per layer and query token: 12 w^2 multiply-adds of projections and MLP, plus 2 (N + T) w of
    attention over all N image + T text keys; a masked forward has ceil(r N) + T query tokens.
    A reference for how far per-call overheads move the measured ratios away from the arithmetic.
    """
    from .masks import tokens_for_ratio

    keys = image_tokens + text_tokens

    def cost(num_layers, width, queries):
        return num_layers * queries * (12 * width * width + 2 * keys * width)

    t_l = cost(layers[0], widths[0], keys)
    return {
        "t_s_over_t_l": cost(layers[1], widths[1], keys) / t_l,
        "t_l_r_over_t_l": {r: cost(layers[0], widths[0], tokens_for_ratio(r, image_tokens) + text_tokens) / t_l for r in buckets},
    }


def build_synthetic_transformer(shape: dict, role: str, seed: int):
    """A random-weight ``SD3Transformer2DModel`` of ``synthetic_shapes(...)[role]``."""
    import torch
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    cfg = shape[role]
    return SD3Transformer2DModel(
        sample_size=shape["latent_side"], patch_size=2, in_channels=16, out_channels=16,
        num_layers=cfg["num_layers"], attention_head_dim=cfg["attention_head_dim"],
        num_attention_heads=cfg["num_attention_heads"], qk_norm=cfg["qk_norm"],
        caption_projection_dim=cfg["num_attention_heads"] * cfg["attention_head_dim"],
        joint_attention_dim=shape["joint_attention_dim"], pooled_projection_dim=shape["pooled_projection_dim"],
        pos_embed_max_size=max(shape["latent_side"] // 2, 16),
    ).eval()


class SyntheticWorkload:
    """SD3-shaped random-weight models with a replayed schedule (the denoisers driven directly)."""

    name = "synthetic"

    def __init__(self, args):
        import torch
        from diffusers import FlowMatchEulerDiscreteScheduler

        from .conditioning import Conditioning

        self.args = args
        self.shape = synthetic_shapes(args.synthetic_scale, tuple(args.synthetic_layers), tuple(args.synthetic_heads))
        self.methods = list(args.methods)
        self.steps = args.synthetic_steps
        d = ReplaySwitches.default(self.steps)
        self.switches = ReplaySwitches(
            stitch=tuple(args.switch_steps) if args.switch_steps else d.stitch,
            tstitch=d.tstitch if args.tstitch_switch is None else args.tstitch_switch,
            srdiffusion=d.srdiffusion if args.srdiffusion_switch is None else args.srdiffusion_switch,
            multi=tuple(args.multi_switch_steps) if args.multi_switch_steps else None,
        )
        self.schedules = {m: replay_stages(StitchConfig.preset(m), self.steps, self.switches) for m in self.methods}
        warm_steps = min(self.steps, 5)
        warm = ReplaySwitches(stitch=(2, 4), tstitch=2, srdiffusion=2, multi=None)
        self.warm_schedules = {m: replay_stages(StitchConfig.preset(m), warm_steps, warm) for m in self.methods}
        self.models = {role: build_synthetic_transformer(self.shape, role, args.seed + i) for i, role in enumerate(("large", "small"))}
        self.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        g = torch.Generator().manual_seed(args.seed)
        s, t = self.shape["latent_side"], self.shape["text_tokens"]
        self.latents = torch.randn(1, 16, s, s, generator=g)  # [1, 16, h, w]
        pe = torch.randn(2, t, self.shape["joint_attention_dim"], generator=g)  # [uncond, cond]
        pooled = torch.randn(2, self.shape["pooled_projection_dim"], generator=g)
        self.cond = Conditioning(pe, pooled) if args.guidance_scale > 1 else Conditioning(pe[1:], pooled[1:])
        sw = self.switches
        self.description = {
            "what": "SD3.5 Large / SD3 Medium-shaped random weights, replayed schedule (denoisers driven directly)",
            "scale": args.synthetic_scale,
            "large_shape": _shape_dict(self.shape["large"]),
            "small_shape": _shape_dict(self.shape["small"]),
            "image_tokens": self.shape["image_tokens"],
            "text_tokens": t,
            "real_tokens": f"{REAL_IMAGE_TOKENS} image + {REAL_TEXT_TOKENS} text",
            "flop_model_at_real_sizes": _flop_text(flop_ratios()),
            "steps": self.steps,
            "guidance_scale": args.guidance_scale,
            "cfg_batch": 2 if args.guidance_scale > 1 else 1,
            "switch_steps": {
                "hybridstitch": list(sw.stitch), "multi_mask": list(sw.multi) if sw.multi else "split evenly",
                "t-stitch": sw.tstitch, "srdiffusion": sw.srdiffusion,
            },
        }

    def _save_folders(self) -> tuple[str, str]:
        root = os.path.join(self.args.engine_cache, f"synthetic-models-s{self.args.synthetic_scale:g}-seed{self.args.seed}")
        dirs = []
        for role in ("large", "small"):
            d = os.path.join(root, role)
            if not os.path.isfile(os.path.join(d, "transformer", "config.json")):
                self.models[role].save_pretrained(os.path.join(d, "transformer"))
            dirs.append(d)
        return dirs[0], dirs[1]

    def runner(self, backend: str) -> Runner:
        from hybridstitch.engine.torch_backend import TorchDenoiser

        if backend == "eager":
            large, small = TorchDenoiser(self.models["large"], "large"), TorchDenoiser(self.models["small"], "small")
        elif backend == "compile":
            _check_compile()
            large = _compiled_denoiser(copy.deepcopy(self.models["large"]), "large")
            small = _compiled_denoiser(copy.deepcopy(self.models["small"]), "small")
        elif backend == "onnxruntime":
            large_dir, small_dir = self._save_folders()
            buckets = sorted({ratio_key(r) for m in self.methods for r in StitchConfig.preset(m).mask_ratios}) or [0.3]
            side = self.shape["latent_side"]
            pipe = _onnx_pipeline(
                large_dir, small_dir,
                os.path.join(self.args.engine_cache, f"synthetic-s{self.args.synthetic_scale:g}-seed{self.args.seed}"),
                height=side, width=side, batch=self.description["cfg_batch"], buckets=buckets,
                text_tokens=self.shape["text_tokens"], threads=self.args.threads, vae_scale_factor=1,
            )
            large, small = pipe.large, pipe.small
        elif backend == "tensorrt":
            _check_tensorrt()
        else:
            raise BackendUnavailable(f"unknown backend {backend!r}")

        def run(config: StitchConfig, warmup: bool):
            stages = (self.warm_schedules if warmup else self.schedules)[config.name]
            return replay_denoise(large, small, self.scheduler, self.latents, self.cond, config, stages,
                                  self.args.guidance_scale)[1]

        return run


def _flop_text(f: dict) -> str:
    return f"t_s/t_l {f['t_s_over_t_l']:.3f}, t_l(r)/t_l " + ", ".join(
        f"{v:.3f} (r {r:g})" for r, v in f["t_l_r_over_t_l"].items())


def _shape_dict(cfg: dict) -> str:
    return (f"{cfg['num_layers']} layers x {cfg['num_attention_heads']} heads x {cfg['attention_head_dim']} "
            f"(qk_norm {cfg['qk_norm']})")


# -- measuring -----------------------------------------------------------------------------------------


@dataclass
class RunRecord:
    """One timed run: end-to-end seconds and where they went."""

    seconds: float  # end to end, as the caller sees it
    model_seconds: float  # inside model calls
    loop_overhead_seconds: float  # in the loop, outside model calls: masks, merging, metric, scheduler
    outside_seconds: float  # outside the loop: inputs, prompt encoding, cache allocation, decoding
    switch_steps: list[int]
    stage_counts: dict[str, int]

    @classmethod
    def from_trace(cls, trace) -> "RunRecord":
        model = trace.model_seconds
        loop = sum(s.overhead_seconds for s in trace.steps)
        return cls(trace.total_seconds, model, loop, max(0.0, trace.total_seconds - model - loop),
                   list(trace.switch_steps), dict(trace.stage_counts))

    @property
    def overhead_share(self) -> float:
        """Share of the end-to-end time outside model calls (the runtime's overhead)."""
        return (self.seconds - self.model_seconds) / self.seconds if self.seconds > 0 else 0.0


@dataclass
class BackendResult:
    status: str = "ok"  # "ok" | "n/a"
    reason: str | None = None
    warmup_seconds: float = 0.0
    runs: dict[str, list[RunRecord]] = field(default_factory=dict)
    traces: dict[str, list] = field(default_factory=dict)


def _fail(result: BackendResult, why: str) -> None:
    result.status, result.reason = "n/a", why


def _error_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def measure_workload(workload, backends, reps: int, compile_budget_s: float, progress: bool = True) -> dict[str, BackendResult]:
    """Warm up every method on every backend, then ``reps`` interleaved timed repetitions."""
    from tqdm.auto import tqdm

    results: dict[str, BackendResult] = {}
    runners: dict[str, Runner] = {}
    for b in backends:
        results[b] = BackendResult()
        try:
            runners[b] = workload.runner(b)
        except BackendUnavailable as e:
            _fail(results[b], str(e))
        except Exception as e:  # a backend that fails to build is reported, not fatal
            _fail(results[b], f"could not build: {_error_line(e)}")

    configs = [StitchConfig.preset(m) for m in workload.methods]
    per_backend = len(configs) * (reps + 1)
    bar = tqdm(total=len(runners) * per_backend, desc=workload.name, unit="run", disable=not progress)
    done = {b: 0 for b in runners}

    def drop(b: str, why: str) -> None:
        _fail(results[b], why)
        del runners[b]
        bar.update(per_backend - done[b])  # the runs it will not do

    for b in list(runners):
        t0 = time.perf_counter()
        try:
            for c in configs:
                bar.set_postfix_str(f"{b} {c.name} warm-up")
                runners[b](c, True)
                done[b] += 1
                bar.update(1)
                if b == "compile" and time.perf_counter() - t0 > compile_budget_s:
                    raise BackendUnavailable(
                        f"torch.compile warm-up passed the {compile_budget_s:g} s budget (--compile-budget-s) "
                        f"after {time.perf_counter() - t0:.0f} s"
                    )
        except Exception as e:
            drop(b, str(e) if isinstance(e, BackendUnavailable) else f"failed in warm-up: {_error_line(e)}")
            continue
        results[b].warmup_seconds = time.perf_counter() - t0
    for _ in range(reps):  # interleaved: every backend and method once per repetition
        for b in list(runners):
            for c in configs:
                bar.set_postfix_str(f"{b} {c.name}")
                try:
                    trace = runners[b](c, False)
                except Exception as e:
                    drop(b, f"failed: {_error_line(e)}")
                    break
                results[b].runs.setdefault(c.name, []).append(RunRecord.from_trace(trace))
                results[b].traces.setdefault(c.name, []).append(trace)
                done[b] += 1
                bar.update(1)
    bar.close()
    return results


# -- summarising ---------------------------------------------------------------------------------------


def _stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def summarize_backend(result: BackendResult) -> dict:
    """Medians, speed-ups over large-only, per-call latencies, the latency model and the bound."""
    if result.status != "ok":
        return {"status": result.status, "reason": result.reason}
    all_traces = [t for ts in result.traces.values() for t in ts]
    samples = per_call_samples(all_traces, by="bucket")
    per_call = {
        "large": _stats(samples["large"]) if samples["large"] else None,
        "small": _stats(samples["small"]) if samples["small"] else None,
        "large_masked": {str(r): _stats(v) for r, v in sorted(samples["large_masked"].items())},
    }
    lat = CallLatencies(
        per_call["large"]["median"] if per_call["large"] else None,
        per_call["small"]["median"] if per_call["small"] else None,
        {r: statistics.median(v) for r, v in samples["large_masked"].items()},
    )
    bound = []
    if lat.large is not None and lat.small is not None:
        for r, t in sorted(lat.masked.items()):
            bound.append({"ratio": r, "t_l_r": t, "t_l_r_over_t_l": t / lat.large, "t_l_r_plus_t_s": t + lat.small,
                          "t_l": lat.large, "holds": mask_ratio_bound(lat.large, lat.small, t)})
    base = result.runs.get("large")
    base_median = statistics.median(r.seconds for r in base) if base else None
    methods = {}
    for name, runs in result.runs.items():
        secs = [r.seconds for r in runs]
        med = statistics.median(secs)
        entry = {
            "seconds": _stats(secs),
            "speedup": base_median / med if base_median else None,
            "switch_steps": runs[0].switch_steps,
            "switch_steps_vary": any(r.switch_steps != runs[0].switch_steps for r in runs),
            "stage_counts": runs[0].stage_counts,
            "overhead_share": statistics.median(r.overhead_share for r in runs),
            "loop_overhead_seconds": statistics.median(r.loop_overhead_seconds for r in runs),
            "outside_seconds": statistics.median(r.outside_seconds for r in runs),
            "model_seconds": statistics.median(r.model_seconds for r in runs),
        }
        try:
            pred = predict_from_trace(result.traces[name][0], lat, by="bucket")
            entry["model"] = pred.to_dict()
            entry["measured_over_model"] = med / pred.total_seconds if pred.total_seconds > 0 else None
        except HybridStitchError as e:
            entry["model"], entry["model_error"] = None, str(e)
        methods[name] = entry
    return {
        "status": "ok",
        "warmup_seconds": result.warmup_seconds,
        "per_call": per_call,
        "t_s_over_t_l": lat.small / lat.large if lat.large and lat.small else None,
        "break_even_ratio": break_even_ratio(lat.large, lat.small) if lat.large and lat.small else None,
        "bound": bound,
        "methods": methods,
    }


def add_eager_speedups(backends: dict) -> None:
    """Each method's speed-up over the PyTorch baseline: large-only on torch eager."""
    eager = backends.get("eager", {})
    base = (eager.get("methods") or {}).get("large") if eager.get("status") == "ok" else None
    for r in backends.values():
        for e in (r.get("methods") or {}).values():
            e["speedup_vs_eager_large"] = base["seconds"]["median"] / e["seconds"]["median"] if base else None


def machine_info(threads: int) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu}, {os.cpu_count()} logical cores, {platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": threads,
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


# -- reporting -----------------------------------------------------------------------------------------


def _fmt_s(st: dict | None) -> str:
    if not st:
        return "-"
    return f"{st['median']:.3g} ({st['min']:.3g}-{st['max']:.3g})"


def _fmt_ms(st: dict | None) -> str:
    if not st:
        return "-"
    return f"{st['median'] * 1e3:.3g} ({st['min'] * 1e3:.3g}-{st['max'] * 1e3:.3g})"


def _stages(counts: dict) -> str:
    return "/".join(str(counts.get(k, 0)) for k in ("large", "masked", "small"))


def render_markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [
        "# Latency benchmark",
        "",
        f"{meta['date']} · {meta['machine']} · torch {meta['torch']}"
        + (f" · onnxruntime {meta['onnxruntime']}" if "onnxruntime" in meta else "")
        + f" · {meta['threads']} thread(s) · warm-up + {meta['reps']} interleaved repetitions; medians (min-max)",
        "",
        "Speed-up: over large-only on the same backend. Overhead: share of the end-to-end time outside model "
        "calls (mask selection, gather/scatter, merging, metric, scheduler, input preparation). Model: the paper's "
        "latency model (Eqs. 3-8) from the per-call latencies measured in the same runs; measured / model > 1 is "
        "the runtime's overhead. Stages: large / masked / small-only steps.",
    ]
    for wname, w in report["workloads"].items():
        lines += ["", f"## {wname}", ""]
        if w.get("status") == "n/a":
            lines.append(f"n/a: {w['reason']}")
            continue
        for k, v in w["description"].items():
            lines.append(f"- {k}: {v}")
        backends = w["backends"]
        ok = [b for b, r in backends.items() if r["status"] == "ok"]
        na = [b for b, r in backends.items() if r["status"] != "ok"]
        methods = w["methods"]
        lines += ["", "### Speed-up over large-only", ""]
        lines.append("| method | " + " | ".join(backends) + " |")
        lines.append("|---|" + "---|" * len(backends))
        for m in methods:
            row = []
            for b in backends:
                r = backends[b]
                e = r.get("methods", {}).get(m) if r["status"] == "ok" else None
                row.append(f"{e['speedup']:.2f}x" if e and e["speedup"] else "n/a")
            lines.append(f"| {m} | " + " | ".join(row) + " |")
        for b in na:
            lines.append(f"\n{b}: n/a ({backends[b]['reason']})")
        for b in ok:
            r = backends[b]
            lines += ["", f"### {b} (warm-up {r['warmup_seconds']:.1f} s)", "",
                      "| method | latency s | speed-up | vs eager large | switch steps | stages L/M/S | overhead "
                      "| model s | measured / model | model speed-up |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for m in methods:
                e = r["methods"].get(m)
                if e is None:
                    continue
                mod = e.get("model")
                sw = ", ".join(map(str, e["switch_steps"])) or "-"
                if e["switch_steps_vary"]:
                    sw += " (varies)"
                model_cells = (f"{mod['total_seconds']:.3g} | {e['measured_over_model']:.3f} | {mod['speedup']:.2f}x"
                               if mod else "n/a | n/a | n/a")
                vs_eager = f"{e['speedup_vs_eager_large']:.2f}x" if e.get("speedup_vs_eager_large") else "n/a"
                speedup = f"{e['speedup']:.2f}x" if e["speedup"] else "n/a"
                lines.append(
                    f"| {m} | {_fmt_s(e['seconds'])} | {speedup} | {vs_eager} | {sw} | {_stages(e['stage_counts'])} | "
                    f"{e['overhead_share']:.1%} | {model_cells} |"
                )
            pc = r["per_call"]
            lines += ["", f"Per-call latencies ({b}), ms: t_l {_fmt_ms(pc['large'])}, t_s {_fmt_ms(pc['small'])}"
                      + (f", t_s/t_l {r['t_s_over_t_l']:.3f} (break-even ratio 1 - t_s/t_l = {r['break_even_ratio']:.2f})"
                         if r["t_s_over_t_l"] else "")]
            if r["bound"]:
                lines += ["", "| bucket r | t_l(r) ms | t_l(r) / t_l | t_l(r) + t_s ms | t_l ms | t_l(r) + t_s < t_l |",
                          "|---|---|---|---|---|---|"]
                for bd in r["bound"]:
                    st = pc["large_masked"][str(bd["ratio"])]
                    lines.append(f"| {bd['ratio']:g} | {_fmt_ms(st)} | {bd['t_l_r_over_t_l']:.3f} | "
                                 f"{bd['t_l_r_plus_t_s'] * 1e3:.3g} | {bd['t_l'] * 1e3:.3g} | "
                                 f"{'yes' if bd['holds'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def render_plot(report: dict) -> bytes | None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(w, d) for w, d in report["workloads"].items() if d.get("status") != "n/a"]
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.6 * len(panels)), squeeze=False)
    for ax, (wname, w) in zip(axes[:, 0], panels):
        methods = w["methods"]
        ok = [b for b, r in w["backends"].items() if r["status"] == "ok"]
        width = 0.8 / max(1, len(ok))
        for j, b in enumerate(ok):
            ys = [(w["backends"][b]["methods"].get(m) or {}).get("speedup") or 0.0 for m in methods]
            ax.bar([i + (j - (len(ok) - 1) / 2) * width for i in range(len(methods))], ys, width, label=b)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("speed-up over large-only")
        na = [f"{b}: n/a" for b, r in w["backends"].items() if r["status"] != "ok"]
        ax.set_title(f"{wname}" + (f"  ({'; '.join(na)})" if na else ""), fontsize=9)
        if ok:
            ax.legend(fontsize=8)
    fig.suptitle(f"{report['meta']['date']} · {report['meta']['machine']} · {report['meta']['threads']} thread(s)", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


# -- the command ------------------------------------------------------------------------------------------


def _csv(choices):
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if choices is not None and x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}; choose from {', '.join(choices)}")
        return items

    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared by ``benchmarks/latency.py`` and ``hybridstitch bench``)."""
    p.add_argument("--workloads", type=_csv(WORKLOADS), default=list(WORKLOADS), help="comma list: testbed,synthetic")
    p.add_argument("--backends", type=_csv(BACKENDS), default=["eager", "compile", "onnxruntime", "tensorrt"],
                   help="testbed backends, comma list of eager,compile,onnxruntime,tensorrt")
    p.add_argument("--synthetic-backends", type=_csv(BACKENDS), default=["eager", "tensorrt"],
                   help="synthetic backends (torch.compile / ONNX export of the 38-layer model take minutes on CPU)")
    p.add_argument("--methods", type=_csv(list(PRESETS)), default=list(DEFAULT_METHODS), help="comma list of preset names")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per method (interleaved)")
    p.add_argument("--threads", type=int, default=1, help="torch / ONNX Runtime threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance-scale", type=float, default=4.0, help="CFG scale (> 1: CFG batch 2)")
    g = p.add_argument_group("testbed")
    g.add_argument("--testbed-large", default=None, help="large folder (default: the shipped testbed)")
    g.add_argument("--testbed-small", default=None, help="small folder (default: the shipped testbed)")
    g.add_argument("--testbed-steps", type=int, default=28)
    g.add_argument("--testbed-size", type=int, default=None, help="height = width in pixels (default: the model's)")
    g.add_argument("--testbed-text-tokens", type=int, default=8, help="text tokens when the folders have no prompt encoder")
    g.add_argument("--prompt", default="a handwritten 3")
    g = p.add_argument_group("synthetic")
    g.add_argument("--synthetic-scale", type=float, default=16,
                   help="divide width, image tokens and text tokens of the real models by this (16: 152/96 wide, 144+21 tokens)")
    g.add_argument("--synthetic-layers", type=int, nargs=2, default=list(REAL_LAYERS), metavar=("LARGE", "SMALL"))
    g.add_argument("--synthetic-heads", type=int, nargs=2, default=[19, 12], metavar=("LARGE", "SMALL"))
    g.add_argument("--synthetic-steps", type=int, default=28)
    g.add_argument("--switch-steps", type=int, nargs=2, default=None, metavar=("S1", "S2"),
                   help="HybridStitch replay: large before S1, masked until S2, small after (default 30%%/70%% of the steps)")
    g.add_argument("--multi-switch-steps", type=int, nargs="+", default=None,
                   help="multi-mask replay: all n+1 switch steps (default: split S1..S2 evenly)")
    g.add_argument("--tstitch-switch", type=int, default=None, help="T-Stitch's first large step (default 40%% small)")
    g.add_argument("--srdiffusion-switch", type=int, default=None, help="SRDiffusion's first small step (default half)")
    p.add_argument("--compile-budget-s", type=float, default=300.0, help="give up on torch.compile after this much warm-up")
    p.add_argument("--engine-cache", default=os.path.join(tempfile.gettempdir(), "hybridstitch-bench-engines"),
                   help="where exported ONNX engines (and saved synthetic models) are kept between runs")
    p.add_argument("--out-dir", default=os.path.join("benchmarks", "results"))
    p.add_argument("--name", default="latency_cpu", help="output file stem: <out-dir>/<name>.{json,md,png}")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> dict:
    """Run the benchmark and write JSON, Markdown and the plot; returns the report."""
    import torch

    if args.reps < 1:
        raise HybridStitchError("--reps must be >= 1")
    torch.set_num_threads(args.threads)
    report: dict = {"meta": {**machine_info(args.threads), "reps": args.reps, "command": " ".join(sys.argv)},
                    "workloads": {}}
    for wname in args.workloads:
        backends = args.backends if wname == "testbed" else args.synthetic_backends
        try:
            workload = TestbedWorkload(args) if wname == "testbed" else SyntheticWorkload(args)
        except BackendUnavailable as e:
            report["workloads"][wname] = {"status": "n/a", "reason": str(e)}
            print(f"{wname}: n/a ({e})", file=sys.stderr)
            continue
        with warnings.catch_warnings():  # the report evaluates the bound itself, per bucket
            warnings.simplefilter("ignore", LatencyBoundWarning)
            results = measure_workload(workload, backends, args.reps, args.compile_budget_s, progress=not args.no_progress)
        report["workloads"][wname] = {
            "status": "ok",
            "description": workload.description,
            "methods": list(workload.methods),
            "backends": {b: summarize_backend(r) for b, r in results.items()},
        }
        add_eager_speedups(report["workloads"][wname]["backends"])
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, args.name)
    atomic_write_text(stem + ".json", json.dumps(report, indent=2))
    md = render_markdown(report)
    atomic_write_text(stem + ".md", md)
    written = [stem + ".json", stem + ".md"]
    if not args.no_plot:
        png = render_plot(report)
        if png is not None:
            atomic_write_bytes(stem + ".png", png)
            written.append(stem + ".png")
    print(md)
    print("wrote " + ", ".join(written))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hybridstitch bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(args)
    except HybridStitchError as e:
        print(f"hybridstitch bench: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
