"""Reading local diffusers folders: transformers, scheduler, and the shared conditioner.

Nothing is downloaded: every path must be a local folder. Errors say which folder and what
it should contain.
"""

from __future__ import annotations

import json
import os

from .errors import HybridStitchError


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise HybridStitchError(f"could not read {path}: {e}; check the file is valid JSON and readable") from e


def transformer_dir(folder: str, role: str) -> str:
    """The folder holding the SD3 transformer's config.json: ``folder/transformer`` or ``folder`` itself."""
    if not folder or not os.path.isdir(folder):
        raise HybridStitchError(
            f"the {role} checkpoint folder {folder!r} does not exist or is not a folder; pass a local diffusers "
            f"pipeline folder (with transformer/) or a transformer folder (with config.json)"
        )
    for cand in (os.path.join(folder, "transformer"), folder):
        cfg = os.path.join(cand, "config.json")
        if os.path.isfile(cfg):
            name = read_json(cfg).get("_class_name")
            if name not in (None, "SD3Transformer2DModel"):
                raise HybridStitchError(
                    f"{cfg} describes a {name}, not an SD3Transformer2DModel; HybridStitch stitches SD3-family "
                    f"transformers (SD3 Medium, SD3.5 Large/Medium)"
                )
            return cand
    raise HybridStitchError(
        f"no transformer found in the {role} folder {folder!r}: expected {folder}/transformer/config.json "
        f"(a diffusers pipeline folder) or {folder}/config.json (a transformer folder)"
    )


def load_transformer(folder: str, role: str, torch_dtype=None):
    from diffusers import SD3Transformer2DModel

    path = transformer_dir(folder, role)
    try:
        model = SD3Transformer2DModel.from_pretrained(path, torch_dtype=torch_dtype)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise HybridStitchError(
            f"could not load the {role} transformer from {path}: {e}; check that the weights "
            f"(diffusion_pytorch_model*.safetensors) are present, complete and match config.json"
        ) from e
    # Without accelerate, diffusers may leave weights in the stored dtype: cast explicitly.
    if torch_dtype is not None and model.dtype != torch_dtype:
        model = model.to(torch_dtype)
    return model


def load_scheduler(folder: str):
    """The large folder's FlowMatchEulerDiscreteScheduler, or SD3's default (shift 3.0)."""
    from .scheduling import sd3_scheduler

    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    return sd3_scheduler(read_json(path) if os.path.isfile(path) else None)


# model_index.json's "_class_name" -> "module:function" loading that folder's conditioner as
# function(folder, index, torch_dtype) -> conditioner or None. Named by import path and imported
# only when such a folder is loaded, so the method package imports no model family's code
# (the testbed's conditioner lives in the testbed package).
CONDITIONER_LOADERS = {
    "StableDiffusion3Pipeline": "hybridstitch.loading:load_sd3_conditioner",
    "HybridStitchTestbedPipeline": "hybridstitch.testbed.conditioner:load_conditioner",
}
# Other diffusers SD3-family pipeline classes (img2img, inpaint, ControlNet, PAG) hold the same
# text encoders and VAE; an unregistered class name is read as one of those.
DEFAULT_CONDITIONER_LOADER = CONDITIONER_LOADERS["StableDiffusion3Pipeline"]


def register_conditioner(class_name: str, loader: str) -> None:
    """Load folders whose ``model_index.json`` has ``_class_name == class_name`` with ``loader``
    (``"module:function"``, imported when such a folder is loaded)."""
    if ":" not in loader:
        raise HybridStitchError(f"conditioner loader {loader!r} must be 'module:function'")
    CONDITIONER_LOADERS[class_name] = loader


def _import_loader(path: str):
    import importlib

    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise HybridStitchError(f"the conditioner loader {path} could not be imported: {e}; install the package that "
                                "provides it, or pass prompt_embeds with output_type='latent'") from e


def load_sd3_conditioner(folder: str, index: dict, torch_dtype=None):
    """A diffusers SD3 pipeline folder's text encoders and VAE; None when its index names none."""
    from .conditioning import SD3Conditioner

    if "text_encoder" not in index or "vae" not in index:
        return None
    index_path = os.path.join(folder, "model_index.json")
    missing = [c for c in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae") if not os.path.isdir(os.path.join(folder, c))]
    if missing:
        raise HybridStitchError(
            f"{index_path} names text encoders and a VAE, but {', '.join(missing)} is missing from {folder}; "
            "copy the whole diffusers pipeline folder, or pass prompt_embeds with output_type='latent'"
        )
    try:
        return SD3Conditioner.from_pretrained(folder, torch_dtype=torch_dtype)
    except (OSError, ValueError) as e:
        raise HybridStitchError(f"could not load the text encoders / VAE from {folder}: {e}") from e


def load_conditioner(folder: str, torch_dtype=None):
    """The conditioner named by ``folder/model_index.json``, or None for transformer-only folders.

    The index's ``_class_name`` picks the loader (:data:`CONDITIONER_LOADERS`).
    """
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        return None
    index = read_json(index_path)
    loader = CONDITIONER_LOADERS.get(index.get("_class_name"), DEFAULT_CONDITIONER_LOADER)
    return _import_loader(loader)(folder, index, torch_dtype)
