"""Trained encoders in run folders: `encoder.safetensors` (the timm model's state dict) + `encoder.json`.

encoder.json says how to rebuild the encoder (arch, preset, geometry, transforms), its sha256, and the
`extract` settings that re-extract a store with it (`mrantool extract --encoder-from RUN`).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from mrantool.encoders.registry import PatchEncoder, create_encoder, file_sha256
from mrantool.errors import ConfigError
from mrantool.files import atomic_path
from mrantool.store import FeatureStore
from mrantool.tiling.presets import get_preset
from mrantool.training.pixels.source import transform_preset
from mrantool.training.runs import read_json, write_json


def save_encoder(folder: Path, encoder: PatchEncoder, identity: dict[str, Any], info: dict[str, Any]) -> None:
    """Write `folder/encoder.safetensors` and `folder/encoder.json` (rebuild recipe from the store `identity`
    the encoder was trained on, its hash, the extract settings, plus `info`)."""
    state = {k: v.detach().cpu().contiguous().clone() for k, v in encoder.model.state_dict().items()}
    with atomic_path(folder / "encoder.safetensors") as temp:
        save_file(state, str(temp), metadata={"format": "pt"})
    g = identity["geometry"]
    arch = identity["encoder"]
    write_json(folder / "encoder.json", {
        "arch": arch, "preset": identity["preset"], "geometry": g, "transforms": identity["transforms"],
        **info, "sha256": file_sha256(folder / "encoder.safetensors"),
        "extract": {"preset": identity["preset"], "encoder": None if arch == get_preset(identity["preset"]).arch
                    else arch, "target_mpp": g["mpp"], "bag_px": g["bag_px"], "grid": g["grid"],
                    "cells": g["cells"]}})


def load_encoder(folder: Path) -> PatchEncoder:
    """The encoder saved in `folder` (eval mode), its file checked against the sha256 in encoder.json."""
    weights, meta_path = folder / "encoder.safetensors", folder / "encoder.json"
    if not weights.is_file() or not meta_path.is_file():
        raise ConfigError(f"{folder} holds no trained encoder (encoder.safetensors + encoder.json); pass a run folder "
                          "written completely by `mrantool fit --end-to-end` or `--finetune`.")
    meta = read_json(meta_path)
    if meta.get("sha256") != file_sha256(weights):
        raise ConfigError(f"{weights} does not match the sha256 in {meta_path} (edited or half-copied); copy the run "
                          "folder again.")
    identity = {"preset": meta["preset"], "geometry": meta["geometry"], "transforms": meta["transforms"]}
    return create_encoder(transform_preset(identity), weights=weights, arch=meta["arch"]).eval()


def label_slides(store: FeatureStore, slide_ids: Sequence[str]) -> list[dict[str, Any]]:
    """encoder.json's `label_slides`: the slides whose labels trained an encoder (its training and validation
    slides), with their file fingerprints, which `extract --encoder-from` checks new slides against."""
    return [{"slide_id": sid, "fingerprint": store.provenance(sid).get("fingerprint")} for sid in slide_ids]


def copy_atomic(src: Path, dst: Path) -> None:
    """Copy a file so that `dst` is either absent or complete."""
    with atomic_path(dst) as temp:
        shutil.copyfile(src, temp)
