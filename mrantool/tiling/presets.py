"""Presets as data: the bag/patch/cell geometry at a physical resolution plus the encoder that fills it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from mrantool.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
H_OPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)  # H-optimus-0/1 model cards
H_OPTIMUS_STD = (0.211883, 0.230117, 0.177517)


@dataclass(frozen=True)
class Geometry:
    """A bag is `bag_px` px square at `mpp` microns/px, cut into `grid` x `grid` patches of `cells` x `cells` cells."""

    bag_px: int
    mpp: float
    grid: int
    cells: int

    def __post_init__(self) -> None:
        if self.bag_px <= 0 or self.grid <= 0 or self.cells <= 0 or self.mpp <= 0:
            raise ConfigError(f"Geometry values must be positive, got {self}; fix bag_px, mpp, grid or cells.")
        if self.bag_px % self.grid:
            raise ConfigError(
                f"bag_px={self.bag_px} is not divisible by grid={self.grid}; choose a bag size that is a "
                "multiple of the patch grid."
            )

    @property
    def patch_px(self) -> int:
        """Patch side in pixels at `mpp`."""
        return self.bag_px // self.grid

    @property
    def n_patches(self) -> int:
        return self.grid * self.grid

    @property
    def n_cells(self) -> int:
        return self.cells * self.cells

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Preset:
    """A geometry and the patch encoder that embeds it (input size, normalisation, how tokens become cells).

    `arch` is the timm architecture built without downloads; `hub` is the pretrained name (e.g. an `hf-hub:` id)
    loaded only when the user asks for pretrained weights. `tokens` says how spatial tokens become the cell grid:
    "cnn" pools the last feature map, "vit" reshapes patch tokens (prefix/register tokens excluded) and pools.
    `feature_index` truncates a CNN after that stage (CLAM's ResNet-50 stops after stage 3: 1024-d).
    """

    name: str
    geometry: Geometry
    arch: str
    embed_dim: int
    input_px: int
    tokens: Literal["cnn", "vit"]
    hub: str | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    feature_index: int | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preset:
        data = dict(data)
        data["geometry"] = Geometry(**data["geometry"])
        data["mean"] = tuple(data["mean"])
        data["std"] = tuple(data["std"])
        return cls(**data)

    def with_overrides(self, *, mpp: float | None = None, bag_px: int | None = None, grid: int | None = None,
                       cells: int | None = None) -> Preset:
        """A copy with some geometry fields replaced (the CLI's --target-mpp, --bag-px, --grid, --cells)."""
        g = self.geometry
        def pick(value: Any, default: Any) -> Any:  # 0 is a (bad) value, not "keep the preset's"
            return default if value is None else value

        geometry = Geometry(bag_px=pick(bag_px, g.bag_px), mpp=pick(mpp, g.mpp), grid=pick(grid, g.grid),
                            cells=pick(cells, g.cells))
        return replace(self, geometry=geometry)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        # The MRAN reference geometry: 1024 px bag at 1.0 mpp, 8x8 patches of 128 px, ResNet-18 4x4 map -> 16 cells.
        Preset("mran", Geometry(1024, 1.0, 8, 4), arch="resnet18", embed_dim=512, input_px=128, tokens="cnn"),
        # The MRAN hierarchy at nucleus scale for 20x images: 8x8 patches of 64 px (32 um), 4x4 cells of 16 px (8 um,
        # about one nucleus); ResNet-18 cut after stage 3 (256-d; its 4x4 map at 64 px gives the cells directly).
        Preset("mran-20x", Geometry(512, 0.5, 8, 4), arch="resnet18", embed_dim=256, input_px=64, tokens="cnn",
               feature_index=3),
        # At 10x (PCam-like tiles): 4x4 patches of 96 px (96 um), 3x3 cells of 32 px (PCam's labelled centre).
        Preset("mran-10x", Geometry(384, 1.0, 4, 3), arch="resnet18", embed_dim=256, input_px=96, tokens="cnn",
               feature_index=3),
        # CLAM's encoder: ResNet-50 truncated after stage 3 (1024-d), 256 px patches at 0.5 mpp (20x).
        Preset("resnet50-trunc", Geometry(1024, 0.5, 4, 4), arch="resnet50", embed_dim=1024, input_px=256,
               tokens="cnn", feature_index=3),
        Preset("vit-s16", Geometry(896, 0.5, 4, 7), arch="vit_small_patch16_224", embed_dim=384, input_px=224,
               tokens="vit"),
        # Foundation-model shape (UNI): ViT-L/16 at 224 px, 0.5 mpp; hub weights only where the user has access.
        Preset("uni", Geometry(896, 0.5, 4, 7), arch="vit_large_patch16_224", embed_dim=1024, input_px=224,
               tokens="vit", hub="hf-hub:MahmoodLab/UNI", model_kwargs={"init_values": 1e-5}),
        # Pathology foundation models (docs/foundation-models.md: sources and which facts are unverified). Their
        # weights load from local files only (--weights DIR or the Hugging Face cache); these architectures and
        # arguments also give the random-init shape. /14 ViTs at 224 px have 16x16 tokens -> 4x4 cells of 28 um.
        Preset("uni2-h", Geometry(896, 0.5, 4, 4), arch="vit_giant_patch14_224", embed_dim=1536, input_px=224,
               tokens="vit", hub="hf-hub:MahmoodLab/UNI2-h",
               model_kwargs={"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
                             "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "no_embed_class": True,
                             "mlp_layer": "SwiGLUPacked", "act_layer": "silu", "reg_tokens": 8,
                             "dynamic_img_size": True}),
        Preset("virchow2", Geometry(896, 0.5, 4, 4), arch="vit_huge_patch14_224", embed_dim=1280, input_px=224,
               tokens="vit", hub="hf-hub:paige-ai/Virchow2",
               model_kwargs={"img_size": 224, "init_values": 1e-5, "reg_tokens": 4, "mlp_ratio": 5.3375,
                             "mlp_layer": "SwiGLUPacked", "act_layer": "silu", "dynamic_img_size": True}),
        Preset("h-optimus-0", Geometry(896, 0.5, 4, 4), arch="vit_giant_patch14_reg4_dinov2", embed_dim=1536,
               input_px=224, tokens="vit", hub="hf-hub:bioptimus/H-optimus-0", mean=H_OPTIMUS_MEAN,
               std=H_OPTIMUS_STD, model_kwargs={"img_size": 224, "init_values": 1e-5}),
        Preset("h-optimus-1", Geometry(896, 0.5, 4, 4), arch="vit_giant_patch14_reg4_dinov2", embed_dim=1536,
               input_px=224, tokens="vit", hub="hf-hub:bioptimus/H-optimus-1", mean=H_OPTIMUS_MEAN,
               std=H_OPTIMUS_STD, model_kwargs={"img_size": 224, "init_values": 1e-5}),
        Preset("prov-gigapath", Geometry(896, 0.5, 4, 7), arch="vit_giant_patch14_dinov2", embed_dim=1536,
               input_px=224, tokens="vit", hub="hf-hub:prov-gigapath/prov-gigapath",
               model_kwargs={"img_size": 224, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
                             "mlp_ratio": 5.33334}),
        # Trains end to end on CPUs: a 5-layer CNN (mrantool.encoders.small_cnn), 64 px patches at 0.5 mpp in 8x8
        # grids, its 4x4 map as 16 cells of 8 um (nucleus scale), 128-d.
        Preset("small-cnn", Geometry(512, 0.5, 8, 4), arch="mrantool_small_cnn", embed_dim=128, input_px=64,
               tokens="cnn"),
        # Small and fast: for tests and CPU demos (ResNet-18 cut after stage 2, 128-d, 64 px patches at 2 mpp).
        Preset("tiny", Geometry(256, 2.0, 4, 2), arch="resnet18", embed_dim=128, input_px=64, tokens="cnn",
               feature_index=2),
    ]
}


def get_preset(name: str) -> Preset:
    """Look a preset up by name, with an error that lists the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"Unknown preset '{name}'; choose one of: {', '.join(sorted(PRESETS))}.") from None
