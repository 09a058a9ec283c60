"""The interface every backend implements: one transformer, full or masked.

The pipeline only talks to these methods, so the torch, ONNX Runtime and TensorRT backends
are interchangeable. Tensors cross the interface as torch tensors on the pipeline's device;
caches are opaque objects owned by one request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from .errors import HybridStitchError


@dataclass(frozen=True)
class TransformerSpec:
    """What the pipeline must know of a transformer, read from its diffusers config."""

    in_channels: int
    out_channels: int
    patch_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    joint_attention_dim: int
    pooled_projection_dim: int
    pos_embed_max_size: int | None
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> "TransformerSpec":
        get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
        return cls(
            in_channels=int(get("in_channels")),
            out_channels=int(get("out_channels") or get("in_channels")),
            patch_size=int(get("patch_size")),
            num_layers=int(get("num_layers")),
            num_heads=int(get("num_attention_heads")),
            head_dim=int(get("attention_head_dim")),
            joint_attention_dim=int(get("joint_attention_dim")),
            pooled_projection_dim=int(get("pooled_projection_dim")),
            pos_embed_max_size=get("pos_embed_max_size"),
            dual_attention_layers=tuple(get("dual_attention_layers", ()) or ()),
            qk_norm=get("qk_norm", None),
        )

    @property
    def attention_slots(self) -> list[tuple[int, str]]:
        """Every attention with an image-token KV cache: (layer, "attn" | "attn2")."""
        slots = []
        for i in range(self.num_layers):
            slots.append((i, "attn"))
            if i in self.dual_attention_layers:
                slots.append((i, "attn2"))
        return slots


@dataclass(frozen=True)
class Bucket:
    """What serves a masked stage of some mask ratio: ``masked_tokens`` (k) image tokens, the
    bucket's own ``ratio``, and the engine graph that takes exactly k tokens (None on backends
    that take any k, such as torch)."""

    ratio: float
    masked_tokens: int
    graph: str | None = None


def check_pair(large: TransformerSpec, small: TransformerSpec) -> None:
    """The two transformers must share the latent space and the text conditioning."""
    for field, what in (
        ("in_channels", "latent channels"),
        ("out_channels", "output channels"),
        ("patch_size", "patch size"),
        ("joint_attention_dim", "text embedding width (joint_attention_dim)"),
        ("pooled_projection_dim", "pooled text embedding width (pooled_projection_dim)"),
    ):
        a, b = getattr(large, field), getattr(small, field)
        if a != b:
            raise HybridStitchError(
                f"the large and small transformers differ in {what}: {a} vs {b}. HybridStitch stitches two models "
                "of one family that share the VAE latent space and text encoders (e.g. SD3.5 Large + SD3 Medium); "
                "choose a matching pair"
            )


@runtime_checkable
class Denoiser(Protocol):
    """One transformer behind a backend. Batches are rows: with classifier-free guidance each image
    is two rows side by side (unconditional, conditional), and every row may be at its own timestep."""

    spec: TransformerSpec
    name: str

    def forward(
        self,
        latents: torch.Tensor,  # [B, C, H, W]
        prompt_embeds: torch.Tensor,  # [B, T, joint_attention_dim]
        pooled: torch.Tensor,  # [B, pooled_projection_dim]
        timestep: torch.Tensor,  # [B], sigma * 1000, per row
    ) -> torch.Tensor:
        """Full forward; returns the velocity [B, C, H, W]."""
        ...

    def validate_request(self, batch: int, height: int, width: int, mask_ratios: Sequence[float] = ()) -> None:
        """Raise HybridStitchError if this backend cannot serve the request: ``batch`` rows at once
        (CFG doubling included), ``height``/``width`` are latent sizes, ``mask_ratios`` the
        masked-large ratios the request may run (empty when it never runs the masked model).
        Called before any work."""
        ...


@runtime_checkable
class MaskedDenoiser(Denoiser, Protocol):
    """A large transformer that can also run on the masked tokens only, over KV caches the caller
    owns (:mod:`hybridstitch.kvcache`: ``{"cache_k.{slot}": [B, H, N, D], ...}``)."""

    def bucket_for(self, ratio: float, num_tokens: int) -> Bucket:
        """The bucket that serves a masked stage of ``ratio`` over ``num_tokens`` image tokens: how
        many tokens it refines and the ratio it was built for. Free-shape backends return
        ``Bucket(ratio, ceil(ratio * N))``."""
        ...

    def forward_store(
        self,
        latents: torch.Tensor,  # [B, C, H, W]
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor,
        timestep: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Full forward that also returns every attention's image-token K/V (after qk-norm):
        (velocity [B, C, H, W], caches ``{name: [B, H, N, D]}``)."""
        ...

    def forward_masked(
        self,
        latents: torch.Tensor,  # [B, C, H, W]
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor,
        timestep: torch.Tensor,
        index: torch.Tensor,  # [B, k] int64, ascending
        caches: dict[str, torch.Tensor],  # [B, H, N, D] each
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Masked forward over ``caches``: (the masked tokens' output [B, k, p*p*C], the caches with
        the masked positions' fresh K/V written -- new tensors; the inputs are not modified)."""
        ...
