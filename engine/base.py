"""What every engine backend shares, in the manner of Polygraphy's ``BaseRunner``: the checks of
an engine folder before anything loads, the checks of a request against the manifest, the
bucket choice, and the engine set a loader returns.

The ONNX Runtime and TensorRT backends are siblings over these classes and never import each
other. Backends receive data (batch, latent size, mask ratios), never a ``StitchConfig``.

    manifest = open_engine_folder(folder, "onnxruntime", verify_files=True)   # refuses what cannot load
    class OrtDenoiser(EngineDenoiser): ...                                     # request checks inherited
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from hybridstitch.denoiser import Bucket, TransformerSpec
from hybridstitch.errors import HybridStitchError
from hybridstitch.masks import tokens_for_ratio
from hybridstitch.scheduling import sd3_scheduler

from .integrity import Verifier
from .manifest import Manifest, read_manifest, weights_changed

log = logging.getLogger(__name__)


# -- the folder ---------------------------------------------------------------------------------------------


def required_graphs(manifest: Manifest) -> list[str]:
    """Every graph an engine set of ``manifest`` loads: the small and the large."""
    return ["small", "large"]


def open_engine_folder(folder: str, backend: str) -> Manifest:
    """The manifest of an engine folder written for ``backend``, refused (with the fix) when the
    folder holds another backend's engines or its export did not finish. Reads only."""
    manifest = read_manifest(folder)
    have = manifest.backend.get("name")
    if have != backend:
        raise HybridStitchError(
            f"{folder} holds {have} engines; load them with that backend (from_engines(..., backend={have!r})), or "
            f"export {backend} engines with hybridstitch-export --backend {backend}"
        )
    if not manifest.complete:
        raise HybridStitchError(
            f"the export into {folder} did not finish (manifest incomplete); rerun the same hybridstitch-export "
            "command: it resumes, building only what is missing"
        )
    return manifest


def check_graph_files(manifest: Manifest, folder: str, hash_files: bool, verifier: Verifier | None = None) -> None:
    """Every graph the set loads is listed and its files are as exported (sizes; sha256 unless
    ``hash_files`` is False, hashing only files whose stat moved since they were hashed)."""
    for name in required_graphs(manifest):
        entry = manifest.graphs.get(name)
        if entry is None:
            raise HybridStitchError(f"the manifest in {folder} lists no {name} graph; re-export the engines")
        why = entry.check_files(folder, hash_files=hash_files, verifier=verifier)
        if why is not None:
            raise HybridStitchError(
                f"the {name} engine in {folder} is not as exported: {why}. Rerun hybridstitch-export with the same "
                "arguments: it rebuilds only the damaged engines"
            )


def check_source_weights(manifest: Manifest, notes: list[str], verifier: Verifier | None = None) -> None:
    """Refuse engines whose checkpoints changed since export (when the checkpoints are still there)."""
    for role in ("large", "small"):
        info = manifest.models[role]
        folder = info["transformer_dir"]
        if not os.path.isdir(folder):
            notes.append(f"{role} checkpoint {folder} not found: weights not re-checked")
            continue
        why = weights_changed(folder, info["weights"], verifier)
        if why is not None:
            raise HybridStitchError(
                f"the {role} weights in {folder} changed since these engines were exported ({why}); the engines "
                f"no longer match them. Re-export (hybridstitch-export --{role} {info['path']} ... --out DIR), or pass "
                "check_weights=False to run the engines as exported"
            )


# -- denoisers ----------------------------------------------------------------------------------------------


class EngineDenoiser:
    """A transformer engine of one folder: the request checks every backend shares.

    Subclasses add ``forward`` (and the large one ``new_cache`` / ``forward_masked``)."""

    backend = "engine"

    def __init__(self, name: str, manifest: Manifest, folder: str, device: torch.device):
        self.name, self.manifest, self.folder, self.device = name, manifest, folder, device
        self.spec: TransformerSpec = manifest.spec(name)

    def batch_problem(self, batch: int) -> str | None:
        """Why these engines cannot run ``batch`` samples (CFG included), or None. The ONNX graphs
        take any batch; backends with fixed-shape profiles narrow this."""
        return None

    def validate_request(self, batch: int, height: int, width: int, mask_ratios: Sequence[float] = ()) -> None:
        """The request's CFG batch and latent size must be ones the engines serve. Called before any work."""
        m = self.manifest
        lh, lw = m.latent_size
        vae = m.resolution["vae_scale_factor"]
        why = self.batch_problem(batch)
        if why is not None:
            raise HybridStitchError(
                f"the engines in {self.folder} {why}; this request needs batch {batch} (prompts x "
                f"num_images_per_prompt, x2 with guidance_scale > 1). Re-export with --batch {batch}, or change the "
                "request"
            )
        if (height, width) != (lh, lw):
            raise HybridStitchError(
                f"the engines in {self.folder} were built for {m.resolution['height']}x{m.resolution['width']} "
                f"(latent {lh}x{lw}); this request is {height * vae}x{width * vae} (latent {height}x{width}). "
                f"Re-export with --height {height * vae} --width {width * vae}, or request "
                f"height={m.resolution['height']}, width={m.resolution['width']}"
            )

    def check_text(self, prompt_embeds: torch.Tensor) -> None:
        """The text conditioning must have the engines' token count (graphs have fixed shapes)."""
        want = [prompt_embeds.shape[0], self.manifest.tokens["text"], self.spec.joint_attention_dim]
        if list(prompt_embeds.shape) != want:
            raise HybridStitchError(
                f"prompt_embeds has shape {list(prompt_embeds.shape)}; the {self.name} engine takes {want} "
                f"({self.manifest.tokens['text']} text tokens). Re-export with --text-tokens {prompt_embeds.shape[1]} "
                "or pad/truncate the text conditioning"
            )


class EngineLargeDenoiser(EngineDenoiser):
    """The large transformer's engine: one graph for the full and the masked steps. Adds the
    bucket choice and the cache-request checks."""

    def __init__(self, manifest: Manifest, folder: str, device: torch.device):
        super().__init__("large", manifest, folder, device)
        self.buckets: list[Bucket] = sorted(manifest.buckets, key=lambda b: b.masked_tokens)
        self.cache_names = [t.name for t in manifest.graphs["large"].inputs if t.name.startswith("cache_")]

    def validate_request(self, batch: int, height: int, width: int, mask_ratios: Sequence[float] = ()) -> None:
        super().validate_request(batch, height, width)
        for r in mask_ratios:
            self.bucket_for(r, self.manifest.tokens["image"])

    def check_tokens(self, num_tokens: int) -> None:
        if num_tokens != self.manifest.tokens["image"]:
            raise HybridStitchError(
                f"{num_tokens} image tokens requested; the engines hold {self.manifest.tokens['image']} "
                f"({self.manifest.describe()})"
            )

    def bucket_for(self, ratio: float, num_tokens: int) -> Bucket:
        """The smallest bucket with at least ``ceil(ratio * N)`` tokens (fixed-shape backends)."""
        self.check_tokens(num_tokens)
        need = tokens_for_ratio(ratio, num_tokens)
        for bucket in self.buckets:
            if bucket.masked_tokens >= need:
                if bucket.masked_tokens != need:
                    log.info("mask ratio %g (%d tokens) is served by the %g bucket (%d tokens)", ratio, need,
                             bucket.ratio, bucket.masked_tokens)
                return bucket
        have = ", ".join(f"{b.ratio:g}" for b in self.buckets) or "none"
        raise HybridStitchError(
            f"mask ratio {ratio:g} ({need} of {num_tokens} tokens) has no bucket in {self.folder}: the engines hold "
            f"buckets {have}, and a ratio is served by the smallest bucket at least as large. Re-export with a "
            f"bucket >= {ratio:g} (hybridstitch-export ... --buckets {' '.join(f'{b.ratio:g}' for b in self.buckets)} "
            f"{ratio:g}), or choose mask ratios of at most {self.buckets[-1].ratio if self.buckets else 0:g}"
        )

    def check_cache_request(self, batch: int, height: int, width: int) -> None:
        """A cache is made for a batch and latent size the engines serve only."""
        if self.batch_problem(batch) is not None or (height, width) != self.manifest.latent_size:
            self.validate_request(batch, height, width)


# -- the loaded set -----------------------------------------------------------------------------------------


@dataclass
class EngineSet:
    """The loaded engines of one folder."""

    folder: str
    manifest: Manifest
    large: EngineLargeDenoiser
    small: EngineDenoiser
    device: torch.device
    notes: list[str] = field(default_factory=list)

    def scheduler(self):
        """The large checkpoint's scheduler as recorded at export (SD3's default when none was)."""
        try:
            return sd3_scheduler(self.manifest.scheduler)
        except Exception as e:  # diffusers' own checks of a config the schema lets through
            raise HybridStitchError(
                f"the scheduler recorded in {self.folder}'s manifest cannot be made ({type(e).__name__}: {e}); "
                "re-export the engines from a checkpoint whose scheduler/scheduler_config.json diffusers loads"
            ) from e


__all__ = [
    "EngineDenoiser",
    "EngineLargeDenoiser",
    "EngineSet",
    "check_graph_files",
    "check_source_weights",
    "open_engine_folder",
    "required_graphs",
]
