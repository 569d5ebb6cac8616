"""Hugging Face hub encoders (`hf-hub:ORG/NAME`) from local files: a model folder or the hub cache, no network.

A hub model is found, in order, in the folder given with `--weights DIR` (a folder holding config.json and the
weights, as `hf download ORG/NAME --local-dir DIR` or timm's `save_for_hf` write it, or a Hugging Face cache folder),
then in the local Hugging Face cache (HF_HUB_CACHE / HF_HOME). Only with `--pretrained`, and never when
HF_HUB_OFFLINE is set, is a missing model downloaded. timm then builds it from the folder (`local-dir:`), with the
architecture, arguments and normalisation constants of its config.json.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from mrantool.errors import ConfigError

HUB_PREFIXES = ("hf-hub:", "hf_hub:")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth")


def is_hub_name(name: str | None) -> bool:
    return bool(name) and str(name).startswith(HUB_PREFIXES)


def split_hub_name(name: str) -> tuple[str, str | None]:
    """`hf-hub:ORG/NAME[@REVISION]` -> (ORG/NAME, REVISION or None)."""
    repo = name.split(":", 1)[1]
    repo, _, revision = repo.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ConfigError(f"Encoder '{name}' is not a hub id; write it as hf-hub:ORG/NAME, e.g. hf-hub:MahmoodLab/UNI.")
    return repo, revision or None


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")


def _checked(folder: Path, name: str) -> Path:
    """`folder` if it holds config.json and a weights file, else a sentence naming what is missing."""
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder} has no config.json, so the architecture of {name} is unknown; download the "
                          f"whole repository (`hf download {split_hub_name(name)[0]} --local-dir DIR`).")
    if not any(p.suffix in WEIGHT_SUFFIXES for p in folder.iterdir() if p.is_file()):
        raise ConfigError(f"{folder} has config.json but no weights file (model.safetensors or pytorch_model.bin) "
                          f"for {name}; download the weights too.")
    return folder


def _from_cache(name: str, cache_dir: Path | None) -> Path:
    from huggingface_hub import constants, snapshot_download

    repo, revision = split_hub_name(name)
    where = cache_dir or Path(constants.HF_HUB_CACHE)
    try:
        return Path(snapshot_download(repo, revision=revision, cache_dir=cache_dir, local_files_only=True))
    except Exception:  # LocalEntryNotFoundError and friends: nothing usable in this cache
        raise ConfigError(f"{name} is not in the Hugging Face cache at {where}; download it once where the hub is "
                          f"reachable (`hf download {repo}`) and copy the cache, or pass --weights DIR holding its "
                          "config.json and weights.") from None


def model_folder(name: str, weights: str | Path | None = None, *, allow_download: bool = False) -> Path:
    """The local folder of hub model `name` (see the module docstring for the search order)."""
    repo, revision = split_hub_name(name)
    if weights is not None:
        folder = Path(weights)
        if not folder.is_dir():
            raise ConfigError(f"--weights {folder} is not a folder; for {name} pass the folder with its config.json "
                              "and weights, or a Hugging Face cache folder.")
        if (folder / "config.json").is_file():
            return _checked(folder, name)
        cache = folder.parent if folder.name == "models--" + repo.replace("/", "--") else folder
        return _checked(_from_cache(name, cache), name)
    try:
        return _checked(_from_cache(name, None), name)
    except ConfigError:
        if not allow_download or offline():
            raise
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.bin"])
    except Exception as exc:  # network, authentication and gated-repository errors
        raise ConfigError(f"{name} could not be downloaded ({type(exc).__name__}); check your access to the "
                          "repository and HF_TOKEN, or pass --weights DIR with a local copy.") from None
    return _checked(Path(folder), name)


def state_sha256(model: nn.Module) -> str:
    """A hash of a model's weights (names, shapes, values) that does not depend on the file format they came in."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(str(tuple(value.shape)).encode())
        digest.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()
