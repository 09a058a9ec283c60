"""Loading the transformers, the scheduler and the shared conditioner from local disk, through
diffusers' own loaders (``from_pretrained(..., local_files_only=True)``, ``from_single_file``).

Where a path points (a diffusers folder, a Hugging Face cache entry, a single file) is decided by
:mod:`hybridstitch.checkpoints`; nothing is downloaded, and errors say which file or folder is
missing and what to pass instead.
"""

from __future__ import annotations

import os

import torch

from .checkpoints import Checkpoint, find_transformer_config, read_json, resolve_checkpoint, resolve_folder
from .conditioning import EncoderOptions, place_conditioner
from .errors import HybridStitchError

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The key every SD3-family transformer has, in SAI's original layout and in diffusers'.
ORIGINAL_KEY = "joint_blocks.0.x_block.attn.qkv.weight"
DIFFUSERS_KEY = "transformer_blocks.0.attn.to_q.weight"


def transformer_dir(folder: str, role: str) -> str:
    """The folder holding the SD3 transformer's config.json: ``folder/transformer`` or ``folder`` itself
    (a cache repo folder resolves to its snapshot first)."""
    cfg, _ = find_transformer_config(resolve_folder(folder, role), role)
    return os.path.dirname(cfg)


# -- devices and dtypes ------------------------------------------------------------------------------


def parse_device(device) -> torch.device:
    """``device`` as a ``torch.device`` that exists on this machine."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise HybridStitchError(f"device {device!r} is not a torch device ({e}); pass e.g. 'cpu' or 'cuda'") from e
    if d.type == "cuda" and not torch.cuda.is_available():
        raise HybridStitchError(f"device {device!r}: CUDA is not available here (torch.cuda.is_available() is False)")
    return d


def check_dtype(torch_dtype) -> torch.dtype | None:
    if torch_dtype is not None and torch_dtype not in DTYPES:
        raise HybridStitchError(
            f"torch_dtype must be torch.float32, torch.bfloat16 or torch.float16 (or None: the default), got {torch_dtype!r}"
        )
    return torch_dtype


def dtype_kwarg(torch_dtype) -> dict:
    """diffusers' keyword for the load dtype: ``dtype`` in releases that renamed it (``torch_dtype``
    then warns on every load), ``torch_dtype`` before."""
    from diffusers.utils import deprecation_utils

    return {"dtype": torch_dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": torch_dtype}


def default_torch_dtype(device: torch.device, large_config: dict, bf16_supported: bool | None = None) -> torch.dtype:
    """The dtype when none is asked for: bfloat16 for a large model with qk-norm (SD3.5) on a CUDA
    device with bfloat16, float32 everywhere else.

    SD3.5 Large's authors run it in bf16; in fp16 its block 35 overflows unless kept in fp32 (as
    the exported engines do), which plain torch modules do not. On the CPU float32 stays the
    default: it is the reference, and many CPUs emulate bf16 matmuls slowly.
    """
    if device.type != "cuda" or not large_config.get("qk_norm"):
        return torch.float32
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16_supported else torch.float32


# -- transformers ------------------------------------------------------------------------------------


def spec_of(ckpt: Checkpoint):
    """The :class:`~hybridstitch.denoiser.TransformerSpec` a checkpoint's config.json describes, with
    diffusers' defaults for the keys a hand-written config leaves out -- read before any weight loads."""
    import inspect

    from diffusers import SD3Transformer2DModel

    from .denoiser import TransformerSpec

    params = inspect.signature(SD3Transformer2DModel.__init__).parameters.values()
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    try:
        return TransformerSpec.from_config({**defaults, **ckpt.config()})
    except (TypeError, ValueError) as e:
        raise HybridStitchError(f"{ckpt.config_path} has an invalid value ({e}); is it an SD3 transformer config?") from e


def _check_single_file(path: str, role: str) -> None:
    """Refuse files that are not an SD3 transformer, or whose weights diffusers would load wrongly,
    from the header alone (no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise HybridStitchError(f"the {role} checkpoint {path} is not a readable .safetensors file: {e}") from e
    if any(k.endswith(".scale_weight") or k.endswith("scaled_fp8") for k in keys):
        raise HybridStitchError(
            f"the {role} checkpoint {path} stores fp8 weights with per-tensor scales (the 'fp8_scaled' format), which "
            "diffusers' single-file loader does not apply: the images would be wrong. Use an unscaled file "
            "(bf16, fp16, or plain fp8 e4m3fn/e5m2) or the diffusers folder"
        )
    if not any(k.endswith(ORIGINAL_KEY) or k == DIFFUSERS_KEY for k in keys):
        shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
        raise HybridStitchError(
            f"the {role} checkpoint {path} holds no SD3 transformer weights (no {ORIGINAL_KEY} or {DIFFUSERS_KEY}; "
            f"its keys: {shown}); is it a VAE or text-encoder file?"
        )


def _from_single_file(ckpt: Checkpoint, torch_dtype: torch.dtype):
    from diffusers import SD3Transformer2DModel

    _check_single_file(ckpt.weights_file, ckpt.role)
    try:
        # config=: the local config.json, so diffusers never fetches its default config from the Hub.
        # torch_dtype: fp8-stored files are upcast into it as they load.
        model = SD3Transformer2DModel.from_single_file(
            ckpt.weights_file, config=ckpt.config_path, local_files_only=True, **dtype_kwarg(torch_dtype)
        )
    except Exception as e:  # diffusers raises KeyError/ValueError/RuntimeError/SingleFileComponentError here
        if "meta tensor" in str(e):  # a weight the config has and the file lacks stayed uninitialised
            raise HybridStitchError(
                f"the {ckpt.role} checkpoint {ckpt.weights_file} lacks weights the config {ckpt.config_path} asks for "
                "(e.g. qk-norm weights for an SD3.5 config); is the file complete, and the config this model's?"
            ) from e
        raise HybridStitchError(
            f"could not load the {ckpt.role} transformer from {ckpt.weights_file} with the config {ckpt.config_path}: "
            f"{type(e).__name__}: {e}. Check that the config is this model's (SD3 Medium, SD3.5 Large and SD3.5 "
            "Medium differ in depth and width)"
        ) from e
    # from_single_file loads into meta-initialised modules: a weight the file lacks stays on "meta"
    # (diffusers' final cast then fails, above; without that cast it would surface here).
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise HybridStitchError(
            f"the {ckpt.role} checkpoint {ckpt.weights_file} lacks weights the config {ckpt.config_path} asks for "
            f"({len(missing)}, e.g. {missing[0]}); is the file complete, and the config this model's?"
        )
    return model


def load_transformer(source, role: str, torch_dtype: torch.dtype | None = None):
    """The ``role`` SD3 transformer from ``source``: a path :func:`~hybridstitch.checkpoints.resolve_checkpoint`
    accepts, or a resolved :class:`~hybridstitch.checkpoints.Checkpoint`."""
    from diffusers import SD3Transformer2DModel

    ckpt = source if isinstance(source, Checkpoint) else resolve_checkpoint(source, role)
    if ckpt.weights_file is not None:
        model = _from_single_file(ckpt, torch_dtype or torch.float32)
    else:
        path = ckpt.transformer_folder
        try:
            model = SD3Transformer2DModel.from_pretrained(path, local_files_only=True, **dtype_kwarg(torch_dtype))
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise HybridStitchError(
                f"could not load the {role} transformer from {path}: {e}; check that the weights "
                f"(diffusion_pytorch_model*.safetensors) are present, complete and match config.json"
            ) from e
    # Without accelerate, diffusers may leave weights in the stored dtype: cast explicitly.
    if torch_dtype is not None and model.dtype != torch_dtype:
        model = model.to(torch_dtype)
    return model.eval()


def load_scheduler(folder: str | None):
    """The folder's FlowMatchEulerDiscreteScheduler, or SD3's default (shift 3.0)."""
    from .scheduling import sd3_scheduler

    path = os.path.join(folder, "scheduler", "scheduler_config.json") if folder else None
    return sd3_scheduler(read_json(path) if path and os.path.isfile(path) else None)


# -- conditioners ----------------------------------------------------------------------------------


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
# Components of model_index.json the conditioner does not load (the denoisers and the scheduler).
NOT_CONDITIONER = ("transformer", "scheduler")
SD3_TEXT_COMPONENTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")


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


def _named_components(index: dict) -> list[str]:
    """Components model_index.json names with a class (``[null, null]`` marks one saved as None)."""
    return [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and any(v)]


def _skipped(options: EncoderOptions) -> set[str]:
    if options.placement == "none":
        return set(SD3_TEXT_COMPONENTS)
    if options.text_encoder_3 == "none":
        return {"text_encoder_3", "tokenizer_3"}
    if options.text_encoder_3 != "load":
        return {"text_encoder_3"}  # a loaded module is given; its tokenizer still comes from the folder
    return set()


def check_components(folder: str, index: dict, options: EncoderOptions) -> None:
    """Every component the conditioner will load is a folder on disk, before any is loaded (a missing
    one would otherwise read as a Hub repo id in the loaders' errors)."""
    need = [c for c in _named_components(index) if c not in NOT_CONDITIONER and c not in _skipped(options)]
    missing = [c for c in need if not os.path.isdir(os.path.join(folder, c))]
    if missing:
        raise HybridStitchError(
            f"{os.path.join(folder, 'model_index.json')} names {', '.join(missing)}, but {folder} has no such "
            "folder; copy the whole diffusers pipeline folder (or finish its download), "
            + ("load without T5 (text_encoder_3='none'), " if missing == ["text_encoder_3"] else "")
            + "or pass prompt_embeds with output_type='latent'"
        )


def load_sd3_conditioner(folder: str, index: dict, torch_dtype=None, options: EncoderOptions | None = None,
                         joint_attention_dim: int | None = None):
    """A diffusers SD3 pipeline folder's text encoders and VAE; None when its index names none."""
    from .conditioning import SD3Conditioner

    if "vae" not in index and "text_encoder" not in index:
        return None
    try:
        # float32 when none is asked for: transformers >= 5 would otherwise load the stored dtype (fp16).
        return SD3Conditioner.from_pretrained(folder, torch_dtype=torch_dtype or torch.float32,
                                              options=options or EncoderOptions(),
                                              joint_attention_dim=joint_attention_dim)
    except (OSError, ValueError, KeyError) as e:
        raise HybridStitchError(f"could not load the text encoders / VAE from {folder}: {e}") from e


def load_conditioner(folder: str, torch_dtype=None, options: EncoderOptions | None = None,
                     joint_attention_dim: int | None = None):
    """The conditioner named by ``folder/model_index.json``, or None for transformer-only folders.

    The index's ``_class_name`` picks the loader (:data:`CONDITIONER_LOADERS`). ``options`` place or
    drop the text encoders (SD3 folders); ``joint_attention_dim`` is the width of the zero padding
    that replaces a dropped T5.
    """
    options = options or EncoderOptions()
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        return None
    index = read_json(index_path)
    check_components(folder, index, options)
    path = CONDITIONER_LOADERS.get(index.get("_class_name"), DEFAULT_CONDITIONER_LOADER)
    loader = _import_loader(path)
    if loader is load_sd3_conditioner:
        return loader(folder, index, torch_dtype, options, joint_attention_dim)
    if options.text_encoder_3 != "load":
        raise HybridStitchError(
            f"text_encoder_3 applies to SD3 pipeline folders; {folder} is a {index.get('_class_name')}"
        )
    try:
        return loader(folder, index, torch_dtype)
    except OSError as e:
        raise HybridStitchError(f"could not load the conditioner of {folder}: {e}") from e


def conditioner_folder_of(given, default: str | None) -> str | None:
    """The folder to take text encoders and VAE from: ``given`` (a local folder or cache entry), else ``default``."""
    if given is None:
        return default
    if not isinstance(given, (str, os.PathLike)) or not os.path.isdir(given):
        raise HybridStitchError(f"conditioner_folder {given!r} does not exist or is not a folder")
    return resolve_folder(os.fspath(given), "conditioner")


def load_placed_conditioner(folder: str | None, torch_dtype, options: EncoderOptions, joint_attention_dim: int,
                            device: torch.device):
    """:func:`load_conditioner`, its text encoders and VAE then placed as ``options`` say."""
    if folder is None:
        return None
    conditioner = load_conditioner(folder, torch_dtype, options, joint_attention_dim)
    if conditioner is not None:
        place_conditioner(conditioner, device, options)
    return conditioner


__all__ = [
    "CONDITIONER_LOADERS",
    "DTYPES",
    "check_components",
    "check_dtype",
    "conditioner_folder_of",
    "default_torch_dtype",
    "dtype_kwarg",
    "load_conditioner",
    "load_placed_conditioner",
    "load_scheduler",
    "load_sd3_conditioner",
    "load_transformer",
    "parse_device",
    "spec_of",
    "read_json",
    "register_conditioner",
    "resolve_checkpoint",
    "transformer_dir",
]
