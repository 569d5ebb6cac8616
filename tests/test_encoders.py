"""Patch encoders: shapes for every preset, cells vs patch pooling, prefix tokens, local weights, errors."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
import safetensors.torch
import timm
import torch

from mrantool.encoders import registry
from mrantool.encoders.registry import create_encoder
from mrantool.encoders.tokens import cells_from_feature_map, cells_from_vit_tokens
from mrantool.encoders.transforms import to_tensor_batch
from mrantool.errors import ConfigError
from mrantool.tiling.presets import PRESETS, Geometry, Preset

REG_PRESET = Preset("reg", Geometry(224, 1.0, 4, 2), arch="vit_small_patch14_reg4_dinov2", embed_dim=384,
                    input_px=56, tokens="vit", model_kwargs={"img_size": 56, "depth": 2})


def _batch(preset: Preset, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, preset.input_px, preset.input_px, generator=torch.Generator().manual_seed(1))


def _run(encoder: registry.PatchEncoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        return encoder(x)


@pytest.fixture(scope="module")
def tiny() -> registry.PatchEncoder:
    return create_encoder(PRESETS["tiny"])


@pytest.mark.parametrize("name", sorted(name for name, p in PRESETS.items() if p.hub is None))  # foundation models:
def test_preset_builds_with_right_shapes(name: str) -> None:  # ViT-L to ViT-g, checked on the meta device instead
    preset = PRESETS[name]
    encoder = create_encoder(preset)
    patch, cells = _run(encoder, _batch(preset))
    c2, d = preset.geometry.n_cells, preset.embed_dim
    assert patch.shape == (2, d) and cells.shape == (2, c2, d)
    assert (encoder.embed_dim, encoder.n_cells, encoder.input_px) == (d, c2, preset.input_px)
    assert torch.isfinite(cells).all() and not torch.equal(patch[0], patch[1])
    ident = encoder.identity()
    assert ident["arch"] == preset.arch and ident["weights"] == "random-init"
    assert (ident["tokens"], ident["embed_dim"], ident["cells"]) == (preset.tokens, d, preset.geometry.cells)
    if preset.tokens == "cnn":  # every CNN preset's map divides evenly into its cells: avg of avg == avg
        torch.testing.assert_close(cells.mean(dim=1), patch, atol=1e-5, rtol=1e-5)


def test_uni_arch_matches_its_preset_dims() -> None:
    preset = PRESETS["uni"]
    with torch.device("meta"):
        model = timm.create_model(preset.arch, num_classes=0, **preset.model_kwargs)
    grid = model.patch_embed.grid_size
    assert model.num_features == preset.embed_dim and model.num_prefix_tokens == 1
    assert grid[0] * 16 == preset.input_px and grid[0] % preset.geometry.cells == 0


def test_truncation_matches_timm_features_only(tiny: registry.PatchEncoder) -> None:
    preset = PRESETS["tiny"]
    reference = timm.create_model(preset.arch, features_only=True, out_indices=(preset.feature_index,)).eval()
    reference.load_state_dict(tiny.model.state_dict(), strict=False)
    x = _batch(preset)
    with torch.inference_mode():
        fmap = reference(x)[0]
    patch, cells = _run(tiny, x)
    torch.testing.assert_close(patch, fmap.mean(dim=(2, 3)))
    torch.testing.assert_close(cells, cells_from_feature_map(fmap, preset.geometry.cells))


def test_random_init_is_deterministic(tiny: registry.PatchEncoder) -> None:
    x = _batch(PRESETS["tiny"])
    assert torch.equal(_run(tiny, x)[1], _run(create_encoder(PRESETS["tiny"]), x)[1])


def test_vit_excludes_class_and_register_tokens() -> None:
    encoder = create_encoder(REG_PRESET)
    assert encoder.n_prefix == 5  # class token + 4 registers
    x = _batch(REG_PRESET)
    with torch.inference_mode():
        tokens = encoder.model.forward_features(x)
        patch, cells = encoder(x)
    assert tokens.shape[1] == 5 + 16 and cells.shape == (2, 4, 384)
    torch.testing.assert_close(patch, tokens[:, 0])  # the class token is this model's pooled output
    grid = tokens[:, 5:].reshape(2, 4, 4, 384)
    torch.testing.assert_close(cells[:, 0], grid[:, :2, :2].mean(dim=(1, 2)))
    torch.testing.assert_close(cells[:, 1], grid[:, :2, 2:].mean(dim=(1, 2)))


def test_cells_from_vit_tokens_drops_prefix_and_is_row_major() -> None:
    patch_tokens = torch.arange(16.0).view(1, 16, 1)
    tokens = torch.cat([torch.full((1, 2, 1), 1e6), patch_tokens], dim=1)
    cells = cells_from_vit_tokens(tokens, n_prefix=2, c=2)
    # 4x4 grid 0..15 in row-major order; cell (r, c) averages a 2x2 block
    assert cells.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    with pytest.raises(ConfigError, match="square"):
        cells_from_vit_tokens(tokens, n_prefix=1, c=2)


def test_weights_round_trip_torch_and_safetensors(tmp_path) -> None:
    preset = PRESETS["tiny"]
    torch.manual_seed(123)
    source = timm.create_model(preset.arch)  # full model with its 1000-class fc, which the encoder ignores
    state = source.state_dict()
    pt, st = tmp_path / "w.pt", tmp_path / "w.safetensors"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, pt)
    safetensors.torch.save_file(state, st)
    from_pt, from_st = create_encoder(preset, weights=pt), create_encoder(preset, weights=st)
    x = _batch(preset)
    patch_pt, cells_pt = _run(from_pt, x)
    patch_st, cells_st = _run(from_st, x)
    assert torch.equal(patch_pt, patch_st) and torch.equal(cells_pt, cells_st)
    assert not torch.allclose(patch_pt, _run(create_encoder(preset), x)[0])
    assert from_pt.identity()["weights"] == f"sha256:{hashlib.sha256(pt.read_bytes()).hexdigest()}"
    assert from_st.identity()["weights"] == f"sha256:{hashlib.sha256(st.read_bytes()).hexdigest()}"


def test_mismatched_weights_file_names_file_and_counts(tmp_path) -> None:
    path = tmp_path / "resnet34.pt"
    torch.save(timm.create_model("resnet34", num_classes=0).state_dict(), path)
    with pytest.raises(ConfigError, match=r"resnet34\.pt does not fit .* 0 missing, \d+ unexpected"):
        create_encoder(PRESETS["mran"], weights=path)


def test_unreadable_or_absent_weights_file(tmp_path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="Could not read weights file"):
        create_encoder(PRESETS["tiny"], weights=junk)
    with pytest.raises(ConfigError, match="does not exist"):
        create_encoder(PRESETS["tiny"], weights=tmp_path / "absent.safetensors")


def test_unknown_arch_says_how_to_list_names() -> None:
    with pytest.raises(ConfigError, match=r"Unknown timm encoder 'resnet1800'.*timm\.list_models"):
        create_encoder(PRESETS["mran"], arch="resnet1800")


def test_arch_override_takes_the_models_dim() -> None:
    encoder = create_encoder(PRESETS["mran"], arch="mobilenetv3_small_100")
    patch, cells = _run(encoder, _batch(PRESETS["mran"]))
    assert encoder.embed_dim == 576 and patch.shape == (2, 576) and cells.shape == (2, 16, 576)
    assert encoder.identity()["arch"] == "mobilenetv3_small_100" and encoder.identity()["embed_dim"] == 576


def test_arch_override_takes_the_models_normalisation() -> None:
    """A TF-ported EfficientNet was trained on inputs scaled to [-1, 1]; ImageNet statistics would shift every
    feature of a user's --weights file (the preset's normalisation stays for its own architecture)."""
    from mrantool.encoders.registry import aligned_preset

    tf_lite = create_encoder(PRESETS["mran-10x"], arch="tf_efficientnet_lite0")
    assert aligned_preset(PRESETS["mran-10x"], tf_lite).mean == (0.5, 0.5, 0.5)
    assert tf_lite.identity()["std"] == [0.5, 0.5, 0.5]
    imagenet = create_encoder(PRESETS["mran-10x"], arch="resnet34")
    assert imagenet.identity()["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert create_encoder(PRESETS["mran-10x"]).identity()["mean"] == list(PRESETS["mran-10x"].mean)


def test_preset_dim_disagreement_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="embed_dim=64"):
        create_encoder(dataclasses.replace(PRESETS["tiny"], embed_dim=64))


def test_unfetchable_pretrained_weights_point_to_weights_flag(monkeypatch, tmp_path) -> None:
    import huggingface_hub
    from huggingface_hub import constants

    def unreachable(*args, **kwargs):
        if kwargs.get("local_files_only"):
            raise FileNotFoundError("not in the cache")
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ConfigError, match=r"hf-hub:MahmoodLab/UNI could not be downloaded.*--weights DIR"):
        create_encoder(PRESETS["uni"], pretrained=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline: the cache is the only place looked at
    with pytest.raises(ConfigError, match=r"hf-hub:MahmoodLab/UNI is not in the Hugging Face cache"):
        create_encoder(PRESETS["uni"], pretrained=True)
    with pytest.raises(ConfigError, match="needs --weights to be a folder"):  # hub models: a folder, not a file
        create_encoder(PRESETS["uni"], pretrained=True, weights="w.pt")
    with pytest.raises(ConfigError, match="not both"):
        create_encoder(PRESETS["tiny"], pretrained=True, weights="w.pt")


def test_to_tensor_batch_normalises_and_resizes() -> None:
    preset = PRESETS["tiny"]
    patches = np.zeros((3, 32, 32, 3), dtype=np.uint8)
    patches[..., 0], patches[..., 1], patches[..., 2] = 255, 128, 0
    x = to_tensor_batch(patches, preset)
    assert x.shape == (3, 3, 64, 64) and x.dtype == torch.float32
    expected = (torch.tensor([1.0, 128 / 255, 0.0]) - torch.tensor(preset.mean)) / torch.tensor(preset.std)
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), expected)
    assert x.std(dim=(0, 2, 3)).max() < 1e-5
    same = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    mean, std = torch.tensor(preset.mean).view(3, 1, 1), torch.tensor(preset.std).view(3, 1, 1)
    manual = (torch.from_numpy(same).permute(0, 3, 1, 2) / 255 - mean) / std
    torch.testing.assert_close(to_tensor_batch(same, preset), manual)
    with pytest.raises(ValueError, match="uint8"):
        to_tensor_batch(same.astype(np.float32), preset)
