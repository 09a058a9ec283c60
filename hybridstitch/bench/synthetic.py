"""The synthetic workload: SD3.5 Large / SD3 Medium-shaped random weights, a replayed schedule.

Depth is real (38 vs 24 layers); width, image tokens and text tokens are divided by one scale
together, so the image : text token ratio (2304 : 333 at 768x768) and the attention :
projection cost ratio stay those of the real models, at a size a CPU can time.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass

from hybridstitch.config import StitchConfig
from hybridstitch.errors import HybridStitchError

from .backends import (
    BackendUnavailable,
    Runner,
    WorkloadSettings,
    check_compile,
    compiled_denoiser,
    engine_folder,
    engine_pipeline,
    is_cached,
)
from .replay import ReplaySwitches, replay_denoise, replay_stages

# The real models (DESIGN.md section 3): SD3.5 Large and SD3 Medium at 768x768.
REAL_LAYERS = (38, 24)
REAL_WIDTHS = (38 * 64, 24 * 64)  # 2432, 1536
REAL_IMAGE_TOKENS = 2304  # 96x96 latent, patch 2
REAL_TEXT_TOKENS = 333  # 77 CLIP + 256 T5
REAL_JOINT_DIM, REAL_POOLED_DIM = 4096, 2048


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
    from hybridstitch.masks import tokens_for_ratio

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


@dataclass(frozen=True)
class SyntheticSettings:
    """The synthetic workload's shape and replayed schedule (``None``: the defaults of
    :meth:`ReplaySwitches.default`)."""

    scale: float = 16.0  # width, image tokens and text tokens of the real models divided by this
    layers: tuple[int, int] = REAL_LAYERS  # large, small
    heads: tuple[int, int] = (19, 12)
    steps: int = 28
    switch_steps: tuple[int, int] | None = None  # HybridStitch: large before S1, masked until S2
    multi_switch_steps: tuple[int, ...] | None = None  # multi-mask: all n + 1 switch steps
    tstitch_switch: int | None = None  # T-Stitch's first large step
    srdiffusion_switch: int | None = None  # SRDiffusion's first small step

    def __post_init__(self) -> None:
        if self.scale <= 0:
            raise HybridStitchError(f"--synthetic-scale must be > 0, got {self.scale}")
        if self.steps < 1 or min(self.layers) < 1 or min(self.heads) < 1:
            raise HybridStitchError("--synthetic-steps, --synthetic-layers and --synthetic-heads must be >= 1")

    def switches(self) -> ReplaySwitches:
        d = ReplaySwitches.default(self.steps)
        return ReplaySwitches(
            stitch=tuple(self.switch_steps) if self.switch_steps else d.stitch,
            tstitch=d.tstitch if self.tstitch_switch is None else self.tstitch_switch,
            srdiffusion=d.srdiffusion if self.srdiffusion_switch is None else self.srdiffusion_switch,
            multi=tuple(self.multi_switch_steps) if self.multi_switch_steps else None,
        )


def _shape_text(cfg: dict) -> str:
    return (f"{cfg['num_layers']} layers x {cfg['num_attention_heads']} heads x {cfg['attention_head_dim']} "
            f"(qk_norm {cfg['qk_norm']})")


def _flop_text(f: dict) -> str:
    return f"t_s/t_l {f['t_s_over_t_l']:.3f}, t_l(r)/t_l " + ", ".join(
        f"{v:.3f} (r {r:g})" for r, v in f["t_l_r_over_t_l"].items())


class SyntheticWorkload:
    """SD3-shaped random-weight models with a replayed schedule (the denoisers driven directly)."""

    name = "synthetic"

    def __init__(self, settings: SyntheticSettings, common: WorkloadSettings):
        import torch
        from hybridstitch.scheduling import sd3_scheduler

        from hybridstitch.conditioning import Conditioning

        self.settings, self.common = settings, common
        self.shape = synthetic_shapes(settings.scale, tuple(settings.layers), tuple(settings.heads))
        # cached methods (diffusers' hooks) need the testbed's trained pair and its own switching: not replayed here
        self.methods = [m for m in common.methods if not is_cached(m)]
        self.steps = settings.steps
        self.switches = settings.switches()
        self.schedules = {m: replay_stages(StitchConfig.preset(m), self.steps, self.switches) for m in self.methods}
        # The warm-up runs every kind of step (large, masked, small) on a short schedule.
        warm_steps = min(self.steps, 5)
        warm = ReplaySwitches(stitch=(2, 4), tstitch=2, srdiffusion=2, multi=None)
        self.warm_schedules = {m: replay_stages(StitchConfig.preset(m), warm_steps, warm) for m in self.methods}
        self.models = {role: build_synthetic_transformer(self.shape, role, common.seed + i)
                       for i, role in enumerate(("large", "small"))}
        self.scheduler = sd3_scheduler()
        g = torch.Generator().manual_seed(common.seed)
        s, t = self.shape["latent_side"], self.shape["text_tokens"]
        self.latents = torch.randn(1, 16, s, s, generator=g)  # [1, 16, h, w]
        pe = torch.randn(2, t, self.shape["joint_attention_dim"], generator=g)  # [uncond, cond]
        pooled = torch.randn(2, self.shape["pooled_projection_dim"], generator=g)
        self.cond = Conditioning(pe, pooled) if common.guidance_scale > 1 else Conditioning(pe[1:], pooled[1:])
        sw = self.switches
        self.description = {
            "what": "SD3.5 Large / SD3 Medium-shaped random weights, replayed schedule (denoisers driven directly)",
            "scale": settings.scale,
            "large_shape": _shape_text(self.shape["large"]),
            "small_shape": _shape_text(self.shape["small"]),
            "image_tokens": self.shape["image_tokens"],
            "text_tokens": t,
            "real_tokens": f"{REAL_IMAGE_TOKENS} image + {REAL_TEXT_TOKENS} text",
            "flop_model_at_real_sizes": _flop_text(flop_ratios()),
            "steps": self.steps,
            "guidance_scale": common.guidance_scale,
            "cfg_batch": common.cfg_batch,
            "switch_steps": {
                "hybridstitch": list(sw.stitch), "multi_mask": list(sw.multi) if sw.multi else "split evenly",
                "t-stitch": sw.tstitch, "srdiffusion": sw.srdiffusion,
            },
        }

    def _save_folders(self) -> tuple[str, str]:
        """The random models as diffusers folders, for the engine export (kept in the engine cache)."""
        root = os.path.join(self.common.engine_cache, f"synthetic-models-s{self.settings.scale:g}-seed{self.common.seed}")
        dirs = []
        for role in ("large", "small"):
            d = os.path.join(root, role)
            if not os.path.isfile(os.path.join(d, "transformer", "config.json")):
                self.models[role].save_pretrained(os.path.join(d, "transformer"))
            dirs.append(d)
        return dirs[0], dirs[1]

    def runner(self, backend: str) -> Runner:
        from hybridstitch.engine.torch_backend import TorchDenoiser

        device = self.latents.device
        if backend == "eager":
            large, small = TorchDenoiser(self.models["large"], "large"), TorchDenoiser(self.models["small"], "small")
        elif backend == "compile":
            check_compile()
            large = compiled_denoiser(copy.deepcopy(self.models["large"]), "large")
            small = compiled_denoiser(copy.deepcopy(self.models["small"]), "small")
        elif backend in ("onnxruntime", "tensorrt"):
            large_dir, small_dir = self._save_folders()
            side = self.shape["latent_side"]
            stem = f"synthetic-s{self.settings.scale:g}-seed{self.common.seed}"
            pipe = engine_pipeline(backend, large_dir, small_dir, engine_folder(self.common, stem, backend), self.common,
                                   methods=self.methods, height=side, width=side, text_tokens=self.shape["text_tokens"], vae_scale_factor=1)
            large, small, device = pipe.large, pipe.small, pipe.device
        else:
            raise BackendUnavailable(f"unknown backend {backend!r}")
        from hybridstitch.conditioning import Conditioning

        # Engines may run on a GPU: inputs go where the denoisers are.
        latents = self.latents.to(device)
        cond = Conditioning(self.cond.prompt_embeds.to(device), self.cond.pooled.to(device))

        def run(config: StitchConfig, warmup: bool):
            stages = (self.warm_schedules if warmup else self.schedules)[config.name]
            return replay_denoise(large, small, self.scheduler, latents, cond, config, stages,
                                  self.common.guidance_scale, device=device)[1][0]

        return run
