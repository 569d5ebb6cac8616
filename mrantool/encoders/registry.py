"""Patch encoders over timm: any timm name, hf-hub models from local files (encoders/hub.py), or a weights file.

One forward pass gives both the patch embedding (B, D) and the c x c cell embeddings (B, c*c, D): a CNN's
final (or truncated) feature map is average-pooled globally and to c x c; a ViT's pooled output is the patch
embedding and its patch tokens (class/register tokens dropped) are pooled to c x c.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import safetensors.torch
import timm
import torch
from torch import nn

from mrantool.encoders import small_cnn  # noqa: F401  (registers mrantool_small_cnn in timm)
from mrantool.encoders.hub import is_hub_name, model_folder, state_sha256
from mrantool.encoders.tokens import cells_from_feature_map, cells_from_vit_tokens, token_grid
from mrantool.errors import ConfigError
from mrantool.tiling.presets import PRESETS, Preset

RANDOM_INIT_SEED = 0
_HUB_PREFIXES = ("hf-hub:", "local-dir:")
_WRAPPER_KEYS = ("state_dict", "model")
_KEY_PREFIXES = ("module.", "model.")
_HEAD_NAMES = ("head", "fc", "classifier", "head.fc")


class PatchEncoder(nn.Module):
    """A timm model that maps (B, 3, H, W) normalised patches to (patch_emb (B, D), cell_emb (B, c*c, D))."""

    def __init__(self, model: nn.Module, *, kind: Literal["cnn", "vit"], feature_index: int | None,
                 cells: int, input_px: int, embed_dim: int, identity: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.kind = kind
        self.feature_index = feature_index
        self.cells = cells
        self.n_cells = cells * cells
        self.input_px = input_px
        self.embed_dim = embed_dim
        self.n_prefix = int(getattr(model, "num_prefix_tokens", 0)) if kind == "vit" else 0
        self._identity = identity

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embed(spatial_features(self.model, x, self.feature_index))

    def embed(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Spatial features (a (B, D, h, w) map or (B, N, D) tokens) -> patch and cell embeddings."""
        if self.kind == "vit":
            patch = self.model.forward_head(feats, pre_logits=True)
            return patch, cells_from_vit_tokens(feats, self.n_prefix, self.cells)
        return feats.mean(dim=(2, 3)), cells_from_feature_map(feats, self.cells)

    def identity(self) -> dict[str, Any]:
        """What produced the features (JSON-ready): name, weights, transforms, token handling and dims."""
        return copy.deepcopy(self._identity)


def spatial_features(model: nn.Module, x: torch.Tensor, feature_index: int | None) -> torch.Tensor:
    """The model's last spatial output: a (B, D, h, w) map (NCHW), or (B, N, D) tokens for ViTs."""
    if feature_index is not None:
        return model.forward_intermediates(x, indices=[feature_index], intermediates_only=True, stop_early=True)[-1]
    feats = model.forward_features(x)
    if feats.ndim == 4 and getattr(model, "output_fmt", "NCHW") == "NHWC":
        feats = feats.permute(0, 3, 1, 2)
    return feats


def create_encoder(preset: Preset, *, weights: str | Path | None = None, pretrained: bool = False,
                   arch: str | None = None) -> PatchEncoder:
    """Build the preset's encoder (or the timm `arch` that overrides it) in eval mode.

    Random init is seeded (RANDOM_INIT_SEED) so "random-init" names one set of weights; `weights` loads a
    local safetensors/torch state dict into the architecture; `pretrained` fetches the timm default weights of
    `arch`. Hub models (`arch` = hf-hub:ORG/NAME, or the preset's hub with `pretrained` or a `weights` folder)
    load from local files with their own normalisation (see `encoders/hub.py`).
    """
    overridden = arch is not None and arch != preset.arch
    name = arch if overridden else preset.arch
    weights_dir = weights is not None and Path(weights).is_dir()
    if is_hub_name(name) or (not overridden and preset.hub and (pretrained or weights_dir)):
        return _create_hub_encoder(preset, name if is_hub_name(name) else str(preset.hub), weights, pretrained,
                                   overridden)
    if pretrained and weights is not None:
        raise ConfigError("Pass either a --weights FILE or pretrained weights, not both.")
    kwargs = {} if overridden else dict(preset.model_kwargs)
    source = name if overridden or not preset.hub else preset.hub
    if pretrained:
        model, weights_id = _build(source, kwargs, pretrained=True), f"pretrained:{source}"
    else:
        model, weights_id = _build(name, kwargs, pretrained=False), "random-init"
    full_keys = set(model.state_dict())
    index = _truncate(model, name, preset.feature_index)
    if weights is not None:
        path = Path(weights)
        _load_weights(model, path, name, full_keys)
        weights_id = f"sha256:{file_sha256(path)}"
    model.eval()
    mean, std = _normalisation(model, preset) if overridden else (preset.mean, preset.std)
    return _finish(model, preset, name=name, overridden=overridden, index=index, identity={
        "arch": name,
        "hub": source if pretrained else None,
        "weights": weights_id,
        "model_kwargs": kwargs,
        "mean": list(mean),
        "std": list(std),
        "input_px": preset.input_px,
        "feature_index": preset.feature_index,
        "cells": preset.geometry.cells,
    })


def _create_hub_encoder(preset: Preset, hub: str, weights: str | Path | None, pretrained: bool,
                        overridden: bool) -> PatchEncoder:
    """A hub model from its local folder, with the input size and normalisation of its own config."""
    if weights is not None and not Path(weights).is_dir():
        raise ConfigError(f"{hub} needs --weights to be a folder (its config.json and weights) or a Hugging Face "
                          f"cache folder, not the file {weights}.")
    known = preset if preset.hub == hub else next((p for p in PRESETS.values() if p.hub == hub), None)
    kwargs = dict(known.model_kwargs) if known else {}
    folder = model_folder(hub, weights, allow_download=pretrained)
    model = _build(f"local-dir:{folder}", kwargs, pretrained=True)
    data = timm.data.resolve_model_data_config(model)
    own = replace(preset, mean=tuple(float(v) for v in data["mean"]), std=tuple(float(v) for v in data["std"]),
                  input_px=int(data["input_size"][-1]))
    model.eval()
    return _finish(model, own, name=hub, overridden=overridden, index=None, identity={
        "arch": str(model.pretrained_cfg.get("architecture", hub)),
        "hub": hub,
        "weights": f"pretrained:{hub}#sha256:{state_sha256(model)}",
        "model_kwargs": kwargs,
        "mean": list(own.mean),
        "std": list(own.std),
        "input_px": own.input_px,
        "feature_index": None,
        "cells": preset.geometry.cells,
    })


def aligned_preset(preset: Preset, encoder: PatchEncoder) -> Preset:
    """`preset` with the encoder's own input size and normalisation (a hub model's config may differ)."""
    ident = encoder.identity()
    return replace(preset, mean=tuple(ident["mean"]), std=tuple(ident["std"]), input_px=int(ident["input_px"]))


def _resolve_layers(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Model arguments as JSON in presets (`"mlp_layer": "SwiGLUPacked"`) resolved to timm's layer classes."""
    out = dict(kwargs)
    if isinstance(out.get("mlp_layer"), str):
        layer = getattr(timm.layers, out["mlp_layer"], None)
        if layer is None:
            raise ConfigError(f"mlp_layer '{out['mlp_layer']}' is not a timm layer; use a name from timm.layers "
                              "such as SwiGLUPacked.")
        out["mlp_layer"] = layer
    return out


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _build(name: str, kwargs: dict[str, Any], *, pretrained: bool) -> nn.Module:
    if not name.startswith(_HUB_PREFIXES) and not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(
            f"Unknown timm encoder '{name}'{hint}; list known names with "
            "`python -c \"import timm; print(timm.list_models('*resnet*'))\"` or pass an 'hf-hub:ORG/NAME' id."
        )
    try:
        if pretrained:
            return timm.create_model(name, pretrained=True, num_classes=0, **_resolve_layers(kwargs))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            return timm.create_model(name, pretrained=False, num_classes=0, **_resolve_layers(kwargs))
    except Exception as e:  # timm, huggingface_hub and network errors have no common base class
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if name.startswith("local-dir:"):
            raise ConfigError(
                f"timm could not build the model in {name[10:]} ({reason}); check that its config.json and weights "
                "belong together (re-download the repository)."
            ) from e
        if pretrained:
            raise ConfigError(
                f"The pretrained weights of '{name}' could not be fetched ({reason}); download them where you "
                "have access and pass --weights FILE."
            ) from e
        raise ConfigError(
            f"timm could not build encoder '{name}' with options {kwargs} ({reason}); check the --encoder name "
            "and the preset's model_kwargs."
        ) from e


def _truncate(model: nn.Module, name: str, feature_index: int | None) -> int | None:
    """Prune the stages after `feature_index` (and the head); return the index to request after pruning."""
    if feature_index is None:
        return None
    if not (hasattr(model, "prune_intermediate_layers") and hasattr(model, "forward_intermediates")):
        raise ConfigError(
            f"timm encoder '{name}' cannot be truncated at feature_index={feature_index}; use a preset "
            "without feature_index or another architecture."
        )
    try:
        kept = model.prune_intermediate_layers([feature_index], prune_norm=True, prune_head=True)
    except (AssertionError, IndexError, ValueError) as e:
        raise ConfigError(
            f"feature_index={feature_index} is not a feature stage of timm encoder '{name}' ({e}); pick an "
            "index from its feature_info."
        ) from e
    return int(kept[-1])


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(f"Weights file {path} does not exist; pass an existing --weights FILE.")
    try:
        if path.suffix == ".safetensors":
            obj: Any = safetensors.torch.load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors, pickle and zip errors have no common base class
        raise ConfigError(
            f"Could not read weights file {path} ({type(e).__name__}); pass a .safetensors file or a "
            "torch state dict saved with torch.save."
        ) from e
    while isinstance(obj, Mapping) and (inner := next(
            (obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)) is not None:
        obj = inner
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"Weights file {path} holds no state dict of tensors; save model.state_dict() instead.")
    state = dict(obj)
    stripped = True
    while stripped:
        stripped = False
        for prefix in _KEY_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped = True
    return state


def _normalisation(model: nn.Module, preset: Preset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input mean and std timm records for an architecture (its weights were trained with them, e.g. 0.5 for
    TF-ported EfficientNets and AugReg ViTs), else the preset's."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None or len(mean) != 3 or len(std) != 3:
        return preset.mean, preset.std
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _is_head(model: nn.Module, key: str) -> bool:
    """A classifier weight/bias (head, fc, classifier, head.fc or the model's own classifier name)."""
    named = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    names = set(_HEAD_NAMES) | ({named} if isinstance(named, str) else set(named))
    module, _, leaf = key.rpartition(".")
    return module in names and "." not in leaf


def _load_weights(model: nn.Module, path: Path, name: str, full_keys: set[str]) -> None:
    """Load a local state dict; only classifier keys (and stages pruned away) may be missing or unexpected."""
    state = _read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state and not (_is_head(model, k) or k.endswith("num_batches_tracked"))]
    unexpected = [k for k in state if k not in own and k not in full_keys and not _is_head(model, k)]
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        example = (missing or unexpected or wrong)[0]
        raise ConfigError(
            f"Weights file {path} does not fit timm encoder '{name}': {len(missing)} missing, {len(unexpected)} "
            f"unexpected and {len(wrong)} wrong-shape keys (first: '{example}'); pass weights saved from this "
            "architecture or choose the matching --encoder."
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def _finish(model: nn.Module, preset: Preset, *, name: str, overridden: bool, index: int | None,
            identity: dict[str, Any]) -> PatchEncoder:
    """Probe one blank patch to learn the token kind and dims, check them against the preset, wrap the model."""
    px, c = preset.input_px, preset.geometry.cells
    try:
        with torch.inference_mode():
            feats = spatial_features(model, torch.zeros(1, 3, px, px), index)
    except Exception as e:  # timm raises AssertionError/RuntimeError/ValueError for unsupported input sizes
        raise ConfigError(
            f"timm encoder '{name}' cannot embed {px} px patches ({type(e).__name__}: {e}); choose a preset whose "
            "input_px suits it or set img_size in the preset's model_kwargs."
        ) from e
    if feats.ndim not in (3, 4):
        raise ConfigError(f"timm encoder '{name}' gives no spatial tokens (output {tuple(feats.shape)}); "
                          "choose a CNN or ViT architecture.")
    kind: Literal["cnn", "vit"] = "vit" if feats.ndim == 3 else "cnn"
    if not overridden and kind != preset.tokens:
        raise ConfigError(f"Preset '{preset.name}' declares tokens='{preset.tokens}' but '{name}' gives "
                          f"{kind} tokens; fix the preset's tokens field.")
    encoder = PatchEncoder(model, kind=kind, feature_index=index, cells=c, input_px=px, embed_dim=0,
                           identity=identity)
    side = token_grid(feats, encoder.n_prefix).shape[-1] if kind == "vit" else min(feats.shape[-2:])
    if side < c:
        raise ConfigError(f"timm encoder '{name}' gives a {side}x{side} token grid at {px} px, smaller than the "
                          f"{c}x{c} cell grid; lower the preset's cells or raise input_px.")
    with torch.inference_mode():
        patch, cells = encoder.embed(feats)
    dim = int(patch.shape[-1])
    if cells.shape[-1] != dim:
        raise ConfigError(f"timm encoder '{name}' pools to {dim}-d but its tokens are {cells.shape[-1]}-d; "
                          "choose an architecture whose pooled output keeps the token width.")
    if not overridden and dim != preset.embed_dim:
        raise ConfigError(f"Preset '{preset.name}' declares embed_dim={preset.embed_dim} but '{name}' gives "
                          f"{dim}-d features; fix the preset's embed_dim or feature_index.")
    encoder.embed_dim = dim
    identity.update(tokens=kind, embed_dim=dim)
    return encoder
