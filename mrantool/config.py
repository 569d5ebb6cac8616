"""One validated config per stage. TOML files (`--config`) and CLI flags both fill it; flags win."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mrantool.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI
    import tomli as tomllib

C = TypeVar("C", bound="StageConfig")


class StageConfig(BaseModel):
    """Base of every stage's config: unknown keys are errors, values are type-checked."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @classmethod
    def load(cls: type[C], path: str | Path | None = None, section: str | None = None, **overrides: Any) -> C:
        """Read `path` (TOML; keys at the top or under [section]), then apply non-None `overrides`."""
        values: dict[str, Any] = {}
        source = "command-line options"
        if path is not None:
            values = read_toml(path)
            if section and isinstance(values.get(section), dict):
                values = values[section]
            source = str(path)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return validate(cls, values, source)


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file with a one-sentence error for a missing or malformed file."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"Config file {path} does not exist; check the --config path.") from None
    except IsADirectoryError:
        raise ConfigError(f"Config file {path} is a folder; pass the TOML file itself to --config.") from None
    except OSError as exc:
        raise ConfigError(f"Config file {path} cannot be read ({exc.strerror}); check the --config path.") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML ({exc}); fix the syntax.") from None


def parse_options(items: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` pairs from the command line; values are read as TOML (true, 0.1, "gated") or kept as text."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"Option '{item}' is not KEY=VALUE; write e.g. -O cells=false.")
        try:
            options[key.strip()] = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            options[key.strip()] = raw.strip()
    return options


def validate(cls: type[C], values: dict[str, Any], source: str) -> C:
    """Build `cls` from `values`, reporting every bad key or value at once."""
    try:
        return cls(**values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(config)"
            if err["type"] == "extra_forbidden":
                known = ", ".join(sorted(cls.model_fields))
                problems.append(f"unknown key '{key}' (known: {known})")
            else:
                problems.append(f"'{key}': {err['msg']}")
        raise ConfigError(f"Invalid settings in {source}: " + "; ".join(problems) + ".") from None


Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


class ExtractConfig(StageConfig):
    """`mrantool extract`: which slides, which store, which encoder and geometry, how to run."""

    slides: list[str] = []
    store: str
    preset: str = "mran"
    encoder: str | None = None  # a timm name replacing the preset's architecture
    weights: str | None = None  # local weights file (safetensors or state dict)
    pretrained: bool = False  # load the preset's hub weights (needs access to the hub)
    encoder_from: str | None = None  # a fine-tuning run whose encoder to use
    allow_label_overlap: bool = False  # extract slides that trained that encoder anyway (recorded in provenance)
    mpp: Positive | None = None  # scan resolution override for slides without (or with wrong) metadata
    mpp_csv: str | None = None  # per-slide scan resolutions (slide,mpp); a row wins over `mpp` and the metadata
    target_mpp: Positive | None = None
    bag_px: Annotated[int, Field(ge=1)] | None = None
    grid: Annotated[int, Field(ge=1)] | None = None
    cells: Annotated[int, Field(ge=1)] | None = None
    min_tissue: Fraction = 0.1
    device: str = "auto"
    batch_size: Annotated[int, Field(ge=1)] = 64
    workers: Annotated[int, Field(ge=0)] = 2
    compile: bool = False  # torch.compile the encoder (compiles for ~1 min; measure: not reliably faster on CPU)
    shard: str | None = None
    quiet: bool = False
    executor: str = "local"  # local | ray
    address: str | None = None  # Ray cluster: "auto" joins the running one; None starts a local one
    encoders: int | None = None  # Ray encoder actors (default: one per GPU, or one per 4 CPUs)
    lock_ttl: float = 600.0  # seconds a lock lives without a heartbeat (a dead extractor's slides wait this long)
    wait: bool = False  # wait for slides other extractors hold, instead of reporting them busy
    cache_dir: str | None = None  # local copies of slides on object storage
    cache_gb: float = 50.0


GLASS_RECIPE: dict[str, Any] = {"tissue_weights": True, "tissue_centring": True, "tissue_spread": True}
"""`fit --glass`: the FitConfig settings for whole slides whose white is background glass. MRAN's weights follow
tissue area and its cells are centred and scaled at their tissue fraction, so glass at a tissue border draws no
cell attention (docs/mran.md). Opt-in: on images whose white is biology (gland lumen in CRC crops) it did not
lower the validation loss."""


class FitConfig(StageConfig):
    """`mrantool fit`: a MIL head trained on a store with cross-validation."""

    store: str
    labels: str
    out: str
    id_column: str = "slide_id"  # the labels file's column of slide ids (e.g. "image")
    label_column: str = "label"  # its column of labels (e.g. "mil_label_has_epithelial")
    model: str = "mran"
    options: dict[str, Any] = {}  # head options, e.g. {"cells": false, "attention": "gated", "t": 0.1}
    folds: int = 5
    repeats: int = 1  # repeated k-fold (Musk protocol: 10 folds x 5 repeats)
    val_fraction: float = 0.2  # of each fold's training slides, for early stopping
    seed: int = 0
    epochs: int = 40
    lr: float = 2e-4
    weight_decay: float = 1e-4
    optimizer: str = "adam"  # adam | adamw | sgd
    momentum: float = 0.9  # sgd only
    patience: int = 20
    min_epochs: int = 5
    monitor: str = "loss"  # validation loss or "auc" picks the best epoch
    smoothing: float = 0.0  # weight of past epochs in an exponential moving average of the monitored value
    weight_ema: float = 0.0  # decay of an exponential moving average of the weights, validated and kept (0: off)
    lr_schedule: str = "constant"  # constant | cosine (per step, from lr to 0 over `epochs`)
    class_weights: bool = True
    standardize: bool = True  # z-score features with the training fold's per-dimension mean and sd
    bag_mining: bool = True  # MRAN: slide attention re-weights bags in the next epoch
    max_bags: int = 64  # bags per slide per step when a slide has more (sampled; all bags at evaluation)
    batch_size: int = 1  # slides per optimiser step, padded with masks (1: the classic one-slide MIL step)
    parallel_folds: int = 0  # folds (and sweep variants of one architecture) trained together; 0 all, 1 one by one
    ensemble: int = 1  # models per fold, each with its own seed and validation split; their probabilities averaged
    patch_min_tissue: float = 0.25  # patches with less tissue are masked out
    cell_min_tissue: float = 0.0  # cells with less tissue get no cell attention (0: none masked; docs/fit.md)
    tissue_weights: bool = False  # MRAN: weights of cells, patches and bags x their tissue area (docs/mran.md)
    tissue_centring: bool = False  # with tissue_weights: cells standardised around their tissue fraction's mean
    tissue_spread: bool = False  # with tissue_centring: and scaled by the spread of cells at their tissue fraction
    cache_gb: float = 4.0
    device: str = "auto"
    threads: int | None = None
    save_attention: bool = True
    # training from pixels (docs/end-to-end.md): the store's encoder architecture and the head train together
    end_to_end: bool = False
    weights: str | None = None  # end_to_end: start the encoder from this weights file (default: random init)
    encoder_from: str | None = None  # end_to_end: start each fold from that fold's encoder of this run
    encoder_lr: float | None = None  # end_to_end: the encoder's learning rate (default: lr)
    augment: bool = True  # end_to_end: random flips and 90-degree rotations of training patches
    batchnorm: str = "batch"  # end_to_end: "batch" (each slide's patch statistics in training) or "frozen"
    color_jitter: float = 0.0  # end_to_end: brightness/contrast/saturation jitter of training patches (0..1)
    pixel_cache_gb: float = 4.0  # end_to_end: RAM budget for the cohort's uint8 pixels
