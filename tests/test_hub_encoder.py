"""`--encoder hf-hub:ORG/NAME` from local files only: a model folder (--weights DIR) or the Hugging Face cache.

A tiny timm ViT is saved the way the hub serves models (config.json with its own normalisation constants and
model.safetensors) and loaded through the real extraction path with the network blocked.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from typer.testing import CliRunner

from mrantool.cli import app
from mrantool.encoders.rebuild import rebuild_encoder
from mrantool.encoders.registry import _resolve_layers, create_encoder
from mrantool.errors import ConfigError
from mrantool.slides.reader import open_slide
from mrantool.store import FeatureStore
from mrantool.tiling.presets import PRESETS, get_preset

HUB = "hf-hub:histo-lab/tiny-vit"
MEAN, STD = (0.7, 0.6, 0.7), (0.2, 0.25, 0.2)  # deliberately not ImageNet's


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test; HF_HUB_OFFLINE is set as a user would."""
    def refuse(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny ViT (64 px input, 16 px tokens -> 4x4 grid, 48-d) saved as a hub model folder."""
    from timm.models import save_for_hf

    folder = tmp_path_factory.mktemp("hub") / "tiny-vit"
    torch.manual_seed(3)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=64, depth=2, embed_dim=48,
                              num_heads=2, num_classes=0)
    save_for_hf(model, folder, safe_serialization=True, data_config={"mean": MEAN, "std": STD})
    return folder


def hub_cache(root: Path, model_dir: Path) -> Path:
    """The Hugging Face cache layout: models--ORG--NAME/snapshots/<commit>/files and refs/main."""
    repo = root / "models--histo-lab--tiny-vit"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return root


def extract(slide: Path, store: Path, *extra: str):
    return CliRunner().invoke(app, ["extract", str(slide), "--store", str(store), "--preset", "tiny", "--workers",
                                    "0", "--encoder", HUB, *extra])


def test_extract_from_a_model_folder_uses_the_models_own_normalisation(small_slide, model_dir, tmp_path):
    result = extract(small_slide, tmp_path / "s.zarr", "--weights", str(model_dir))
    assert result.exit_code == 0, result.output
    store = FeatureStore.open(tmp_path / "s.zarr")
    ident = store.identity
    assert ident["encoder"] == HUB and ident["weights"].startswith(f"pretrained:{HUB}#sha256:")
    assert ident["transforms"]["mean"] == list(MEAN) and ident["transforms"]["std"] == list(STD)
    assert ident["embed_dim"] == 48 and ident["transforms"]["input_px"] == 64

    slide = store.slide("disc")
    bag = int(np.argmax(slide.patch_tissue[:].astype(np.float32).sum(1)))
    x0, y0 = (int(v) for v in slide.coords[bag])
    with open_slide(small_slide) as s:  # tiny preset: the bag's first patch is 64 px at 2 mpp
        rgb = s.read_region_mpp(x0, y0, 64, 2.0).astype(np.float32) / 255
    reference = timm.create_model(f"local-dir:{model_dir}", pretrained=True, num_classes=0).eval()

    def cls(mean, std) -> np.ndarray:
        x = torch.from_numpy((rgb - np.array(mean)) / np.array(std)).permute(2, 0, 1)[None].float()
        with torch.no_grad():
            return reference.forward_head(reference.forward_features(x), pre_logits=True)[0].numpy()

    stored = slide.patch_emb[bag, 0].astype(np.float32)
    np.testing.assert_allclose(stored, cls(MEAN, STD), rtol=0.02, atol=0.02)
    assert np.abs(stored - cls((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))).max() > 0.05  # ImageNet's would differ


def test_the_hub_cache_gives_the_same_model(small_slide, model_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache(tmp_path / "hf", model_dir)))
    from_cache = create_encoder(get_preset("tiny"), arch=HUB)
    from_folder = create_encoder(get_preset("tiny"), arch=HUB, weights=model_dir)
    assert from_cache.identity() == from_folder.identity()  # same weights hash, transforms and dims
    repo_folder = tmp_path / "hf" / "models--histo-lab--tiny-vit"
    as_cache_folder = create_encoder(get_preset("tiny"), arch=HUB, weights=repo_folder)
    assert as_cache_folder.identity()["weights"] == from_folder.identity()["weights"]
    result = extract(small_slide, tmp_path / "s.zarr")
    assert result.exit_code == 0, result.output
    rebuilt = rebuild_encoder(FeatureStore.open(tmp_path / "s.zarr").identity)  # e.g. for `query --image`
    assert rebuilt.identity()["weights"] == from_folder.identity()["weights"]


def test_missing_models_are_one_sentence_and_never_downloaded(small_slide, model_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    result = extract(small_slide, tmp_path / "s.zarr", "--pretrained")  # HF_HUB_OFFLINE: no download either
    out = " ".join(result.output.split())
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{HUB} is not in the Hugging Face cache at {tmp_path / 'empty-cache'}" in out
    assert "hf download histo-lab/tiny-vit" in out and "--weights DIR" in out
    no_weights = tmp_path / "config-only"
    no_weights.mkdir()
    shutil.copy(model_dir / "config.json", no_weights)
    with pytest.raises(ConfigError, match="no weights file"):
        create_encoder(get_preset("tiny"), arch=HUB, weights=no_weights)
    with pytest.raises(ConfigError, match="needs --weights to be a folder"):
        create_encoder(get_preset("tiny"), arch=HUB, weights=model_dir / "model.safetensors")
    with pytest.raises(ConfigError, match="hf-hub:ORG/NAME"):
        create_encoder(get_preset("tiny"), arch="hf-hub:no-slash")
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("name", ["uni", "uni2-h", "virchow2", "h-optimus-0", "h-optimus-1", "prov-gigapath"])
def test_foundation_model_presets_describe_their_architecture(name):
    """The preset table's facts (docs/foundation-models.md), checked on the architecture built without memory."""
    preset = PRESETS[name]
    with torch.device("meta"):
        model = timm.create_model(preset.arch, pretrained=False, num_classes=0, **_resolve_layers(preset.model_kwargs))
    side = model.patch_embed.grid_size[0]
    assert model.num_features == preset.embed_dim
    assert model.patch_embed.img_size == (preset.input_px, preset.input_px)
    assert side % preset.geometry.cells == 0  # whole tokens per cell
    assert preset.geometry.patch_px == preset.input_px and preset.geometry.mpp == 0.5
    prefix = {"uni": 1, "uni2-h": 9, "virchow2": 5, "h-optimus-0": 5, "h-optimus-1": 5, "prov-gigapath": 1}[name]
    assert model.num_prefix_tokens == prefix
