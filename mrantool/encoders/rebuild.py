"""Rebuild the encoder that wrote a store from the store's identity (for encoding query images or fine-tuning)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mrantool.encoders.hub import is_hub_name
from mrantool.encoders.registry import PatchEncoder, create_encoder, file_sha256
from mrantool.errors import ConfigError
from mrantool.tiling.presets import Geometry, get_preset


def rebuild_encoder(identity: dict[str, Any], weights: str | Path | None = None) -> PatchEncoder:
    """The store's encoder: same architecture, weights, transforms and cell grid.

    Random-init encoders are seeded and rebuild exactly; hub models load from the same local folder or cache
    (`weights` may name the folder); local weights need the file (`weights`), whose hash must match the one the
    store recorded.
    """
    preset = get_preset(identity["preset"])
    geometry = Geometry(**identity["geometry"])
    transforms = identity["transforms"]
    preset = preset.__class__(**{**preset.to_dict(), "geometry": geometry, "input_px": transforms["input_px"],
                                 "mean": tuple(transforms["mean"]), "std": tuple(transforms["std"]),
                                 "feature_index": transforms["feature_index"]})
    recorded = str(identity["weights"])
    if recorded.startswith("sha256:") and weights is None:
        raise ConfigError(
            f"The store's encoder uses local weights ({recorded[:19]}...); pass the same file with --weights."
        )
    pretrained = recorded.startswith("pretrained")
    if is_hub_name(identity["encoder"]) and "#sha256:" in recorded:  # a hub model read from local files
        encoder = create_encoder(preset, weights=weights, arch=identity["encoder"])
    else:
        arch = None if pretrained else identity["encoder"]
        encoder = create_encoder(preset, weights=weights if not pretrained else None, pretrained=pretrained,
                                 arch=arch)
    got = encoder.identity()["weights"]
    if got != recorded:
        raise ConfigError(
            f"The weights given ({got}) are not the ones the store was extracted with ({recorded}); pass the "
            "original --weights file."
        )
    return encoder


def encoder_weights_from_run(run_dir: str | Path) -> Path:
    """The fine-tuned encoder file of a `finetune` run (for `extract --encoder-from RUN`), hash-checked."""
    run_dir = Path(run_dir)
    weights, meta = run_dir / "encoder.safetensors", run_dir / "encoder.json"
    if not weights.is_file() or not meta.is_file():
        raise ConfigError(f"{run_dir} holds no fine-tuned encoder (encoder.safetensors + encoder.json); pass the "
                          "output folder of `mrantool fit --finetune`.")
    expected = json.loads(meta.read_text()).get("sha256")
    if expected != file_sha256(weights):
        raise ConfigError(f"{weights} does not match the sha256 in {meta} (edited or half-copied); copy the run "
                          "folder again.")
    return weights


def finetuned_extract_settings(run_dir: str | Path) -> dict[str, Any]:
    """The preset and geometry a fine-tuning run's encoder was trained with (encoder.json's `extract` block)."""
    return json.loads((Path(run_dir) / "encoder.json").read_text())["extract"]
