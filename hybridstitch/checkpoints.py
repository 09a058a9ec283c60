"""What a checkpoint path names, resolved on local disk only: :class:`Checkpoint`.

SD3.5 users hold their weights in one of these forms, and each resolves to the folder (or file)
holding the transformer's ``config.json`` and its weights:

- a diffusers pipeline folder (``transformer/`` inside) or a transformer folder (``config.json``);
- a Hugging Face cache entry: the repo folder ``<cache>/models--org--name`` (its ``refs/main``
  names the snapshot), a snapshot folder ``.../snapshots/<revision>`` (a diffusers folder of links
  into ``blobs/``), or the repo id ``org/name`` when that repo is in the local cache;
- a single ``.safetensors`` file (SAI's original keys or diffusers' keys, any float dtype including
  fp8) plus a config: ``config=`` (a pipeline folder, a transformer folder or a ``config.json``),
  else a ``config.json`` beside the file.

Nothing here reaches the network: a cache entry is read as the cache's documented layout
(``refs/main`` -> ``snapshots/<revision>``), and whatever is missing is an error that names it.
(``huggingface_hub.snapshot_download(local_files_only=True)`` is not used: it refuses a snapshot
with any file of the repo missing, and SD3.5 users often download the diffusers parts only.)
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from .errors import HybridStitchError

SINGLE_FILE_SUFFIXES = (".safetensors",)  # the extension diffusers reads as safetensors
# Pickled checkpoints run code when loaded; diffusers reads them with torch.load.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise HybridStitchError(f"could not read {path}: {e}; check the file is valid JSON and readable") from e
    if not isinstance(data, dict):
        raise HybridStitchError(f"{path} holds a JSON {type(data).__name__}, not an object; is it a diffusers config?")
    return data


@dataclass(frozen=True)
class Checkpoint:
    """One transformer's weights on local disk."""

    role: str  # "large" | "small"
    source: str  # what the user passed
    config_path: str  # the transformer's config.json
    weights_file: str | None = None  # a single-file checkpoint; None: diffusers weights beside config.json
    pipeline_folder: str | None = None  # the diffusers pipeline folder around it (model_index.json, scheduler/, ...)

    @property
    def transformer_folder(self) -> str:
        return os.path.dirname(self.config_path)

    def config(self) -> dict:
        return read_json(self.config_path)


def _broken_links(folder: str) -> list[str]:
    out = []
    for root, _, files in os.walk(folder):
        out += [os.path.join(root, f) for f in files if not os.path.exists(os.path.join(root, f))]
    return sorted(out)


def _check_class(cfg_path: str) -> None:
    name = read_json(cfg_path).get("_class_name")
    if name not in (None, "SD3Transformer2DModel"):
        raise HybridStitchError(
            f"{cfg_path} describes a {name}, not an SD3Transformer2DModel; HybridStitch stitches SD3-family "
            f"transformers (SD3 Medium, SD3.5 Large/Medium)"
        )


def find_transformer_config(folder: str, role: str) -> tuple[str, str | None]:
    """(``config.json`` of the transformer, the pipeline folder around it or None) in a local folder."""
    for cand, pipeline in ((os.path.join(folder, "transformer"), folder), (folder, None)):
        cfg = os.path.join(cand, "config.json")
        if os.path.isfile(cfg):
            _check_class(cfg)
            return cfg, pipeline
    broken = _broken_links(folder)
    if broken:
        raise HybridStitchError(
            f"the {role} folder {folder} is an incomplete download: {len(broken)} file(s) link to missing blobs "
            f"(e.g. {broken[0]}); finish the download (hf download <repo>) and try again"
        )
    raise HybridStitchError(
        f"no transformer found in the {role} folder {folder!r}: expected {folder}/transformer/config.json "
        f"(a diffusers pipeline folder) or {folder}/config.json (a transformer folder)"
    )


def _is_repo_cache(folder: str) -> bool:
    return os.path.basename(os.path.normpath(folder)).startswith("models--") and os.path.isdir(
        os.path.join(folder, "snapshots"))


def _snapshot_in(repo_folder: str, role: str) -> str:
    """The snapshot ``refs/main`` names in a cache repo folder (the only snapshot when there is no ref)."""
    snapshots = os.path.join(repo_folder, "snapshots")
    ref = os.path.join(repo_folder, "refs", "main")
    if os.path.isfile(ref):
        with open(ref, encoding="utf-8") as f:
            revision = f.read().strip()
        snapshot = os.path.join(snapshots, revision)
        if os.path.isdir(snapshot):
            return snapshot
        raise HybridStitchError(
            f"the {role} cache folder {repo_folder}: refs/main names revision {revision!r}, but {snapshot} is missing "
            "(an incomplete download); download it again, or pass one of the snapshot folders in snapshots/"
        )
    revisions = sorted(os.listdir(snapshots)) if os.path.isdir(snapshots) else []
    if len(revisions) == 1:
        return os.path.join(snapshots, revisions[0])
    raise HybridStitchError(
        f"the {role} cache folder {repo_folder} has no refs/main and {len(revisions)} snapshots "
        f"({', '.join(revisions) or 'none'}); pass the snapshot folder to use (.../snapshots/<revision>)"
    )


def _cached_repo(repo_id: str, role: str) -> str:
    """The snapshot of ``repo_id`` in the local Hugging Face cache (HF_HUB_CACHE / HF_HOME honoured)."""
    from huggingface_hub.constants import HF_HUB_CACHE

    folder = os.path.join(HF_HUB_CACHE, "models--" + repo_id.replace("/", "--"))
    if not os.path.isdir(folder):
        raise HybridStitchError(
            f"the {role} checkpoint {repo_id!r} does not exist as a local path, nor as a repo in the local Hugging Face "
            f"cache ({HF_HUB_CACHE}). hybridstitch never downloads: pass a local folder or file, or fetch the repo "
            f"first (hf download {repo_id})"
        )
    return _snapshot_in(folder, role)


def _config_for_file(file: str, config: str | None, role: str) -> tuple[str, str | None]:
    if config is not None:
        if os.path.isfile(config):
            _check_class(config)
            return config, None
        if os.path.isdir(config):
            return find_transformer_config(resolve_folder(config, f"{role} config"), f"{role} config")
        raise HybridStitchError(
            f"the {role} config {config!r} does not exist: pass a diffusers pipeline folder, a transformer folder or "
            "its config.json"
        )
    beside = os.path.join(os.path.dirname(os.path.abspath(file)), "config.json")
    if os.path.isfile(beside):
        _check_class(beside)
        return beside, None
    raise HybridStitchError(
        f"the {role} checkpoint {file} is a single file, which holds weights but no model config, and there is no "
        f"config.json beside it. Pass {role}_config= (CLI: --{role}-config) a local diffusers folder of the same "
        "model (its transformer/config.json is read; the weights there are not needed). hybridstitch never fetches "
        "diffusers' default config from the Hub"
    )


def resolve_folder(path: str, role: str) -> str:
    """A local folder as given, with a cache repo folder or cached repo id turned into its snapshot."""
    if os.path.isdir(path):
        return _snapshot_in(path, role) if _is_repo_cache(path) else path
    if not os.path.exists(path) and REPO_ID.match(path) and not path.startswith((".", "~")):
        return _cached_repo(path, role)
    raise HybridStitchError(
        f"the {role} checkpoint {path!r} does not exist or is not a folder; pass a local diffusers pipeline folder "
        "(with transformer/), a transformer folder (with config.json), a Hugging Face cache folder, or a single "
        ".safetensors file"
    )


def resolve_checkpoint(path, role: str, config: str | None = None) -> Checkpoint:
    """Where the ``role`` transformer's config and weights are (see the module docstring)."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise HybridStitchError(f"the {role} checkpoint must be a path (a folder or a .safetensors file), got {path!r}")
    path = os.fspath(path)
    if config is not None:
        if not isinstance(config, (str, os.PathLike)):
            raise HybridStitchError(f"{role}_config must be a path, got {type(config).__name__}")
        config = os.fspath(config)
    if os.path.isfile(path):
        if path.endswith(PICKLE_SUFFIXES):
            raise HybridStitchError(
                f"{path} is a pickled checkpoint, which can run code when loaded; use the .safetensors version of it"
            )
        if not path.endswith(SINGLE_FILE_SUFFIXES):
            raise HybridStitchError(
                f"the {role} checkpoint {path} is a file but not a .safetensors checkpoint; pass a .safetensors file or "
                "a diffusers folder"
            )
        cfg, pipeline = _config_for_file(path, config, role)
        return Checkpoint(role, path, cfg, weights_file=path, pipeline_folder=pipeline)
    if config is not None:
        raise HybridStitchError(
            f"{role}_config is for single-file checkpoints; {path} is a folder and carries its own config"
        )
    folder = resolve_folder(path, role)
    cfg, pipeline = find_transformer_config(folder, role)
    return Checkpoint(role, path, cfg, pipeline_folder=pipeline)


__all__ = ["Checkpoint", "find_transformer_config", "read_json", "resolve_checkpoint", "resolve_folder"]
