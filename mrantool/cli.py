"""The `mrantool` command line: parses options, calls the Python API, renders results with rich. No logic here."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from mrantool.errors import MrantoolError
from mrantool.files import os_error_message

app = typer.Typer(
    name="mrantool",
    help="Cache multi-scale WSI features once; train MRAN and other MIL heads on the cache.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Paths, slide ids and messages are printed verbatim: no rich markup ([batch2] stays), no emoji codes (:a:).
console = Console(markup=False, emoji=False, highlight=False)
err_console = Console(stderr=True, markup=False, emoji=False, highlight=False)
T = TypeVar("T")


def fail(message: str) -> typer.Exit:
    """Print `message` after a red 'error:' (verbatim) and return the exit to raise (code 1)."""
    err_console.print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True)
    return typer.Exit(1)


def run_api(fn: Callable[[], T]) -> T:
    """Call the API; a user error or an OS failure becomes one red sentence and exit code 1, never a traceback."""
    try:
        return fn()
    except MrantoolError as exc:
        raise fail(str(exc)) from None
    except OSError as exc:
        raise fail(os_error_message(exc, "use")) from None


def _print_failures(failed: list) -> None:
    """One line per failed item (its one-sentence message), after the results table."""
    for item in failed:
        err_console.print(f"failed: {item.message}", soft_wrap=True, markup=False, highlight=False)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the cohort, store, run, heatmap and index.")] = Path("demo"),
    slides: Annotated[int, typer.Option(help="Slides in the generated cohort.")] = 16,
    preset: Annotated[str, typer.Option(help="Extraction preset (mran; tiny for a quick look).")] = "mran",
    seed: Annotated[int, typer.Option(help="Seed for the cohort, splits and training.")] = 0,
    size: Annotated[int, typer.Option(help="Slide side in pixels at 0.5 mpp.")] = 4096,
    folds: Annotated[int, typer.Option(help="Cross-validation folds.")] = 4,
    epochs: Annotated[int, typer.Option(help="Maximum epochs per fold.")] = 40,
) -> None:
    """Run the whole flow on a generated cohort: slides, extract, fit MRAN with CV, heatmap, index, query.

    Example: mrantool demo --out demo/   (a quick look: --preset tiny --slides 4 --size 1024 --folds 2 --epochs 2)
    """
    from mrantool.cli_render import extract_progress, fit_progress
    from mrantool.demo import DemoSettings, run_demo

    settings = DemoSettings(slides=slides, preset=preset, seed=seed, size=size, folds=folds, epochs=epochs)
    with extract_progress(console, quiet=True) as ep, fit_progress(console, quiet=True) as fp:
        result = run_api(lambda: run_demo(out, settings, say=lambda m: console.print(m, soft_wrap=True, markup=False),
                                          extract_progress=ep, fit_progress=fp))
    total = sum(seconds for _, seconds, _ in result.steps)
    console.print(f"demo finished in {total:.0f}s; everything is in {result.out}/", soft_wrap=True)


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Argument(help="Folder for the slides and labels.csv.")],
    slides: Annotated[int, typer.Option("--slides", help="Number of slides (half tumour, half normal).")] = 12,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same pixels.")] = 0,
    size: Annotated[int | None, typer.Option(help="Slide side in pixels at 0.5 mpp (generated cohort; default "
                                                  "6144).")] = None,
    foci: Annotated[int | None, typer.Option(help="Tumour foci per tumour slide (generated cohort; default 1-2 "
                                                  "per 6144 px square).")] = None,
    focus_um: Annotated[tuple[float, float] | None, typer.Option(
        help="Focus radius range in um (generated cohort; default 170 260: foci span patches; 25 40: a few "
             "tumour nuclei, a signal carried by cells).")] = None,
    from_tiles: Annotated[Path | None, typer.Option(help="Folder of labelled tiles: build a mosaic cohort.")] = None,
    tile_labels: Annotated[Path | None, typer.Option(help="Tile CSV: path (relative to --from-tiles), 0/1 label "
                                                          "(default: labels.csv in --from-tiles).")] = None,
    tile_mpp: Annotated[float | None, typer.Option(help="The tiles' microns per pixel (PCam: 0.97).")] = None,
    tiles_per_slide: Annotated[int | None, typer.Option(help="Tiles per mosaic slide (default 64).")] = None,
    positives: Annotated[int | None, typer.Option(help="Label-1 tiles per positive slide (default 4).")] = None,
    label_column: Annotated[str | None, typer.Option(help="The tile CSV's label column, if it has several.")] = None,
    margin: Annotated[int | None, typer.Option(help="Glass border around a mosaic, level-0 px (default 0).")] = None,
) -> None:
    """Generate a small cohort of slides, or with --from-tiles a mosaic cohort of real labelled tiles.

    Generated: pyramidal TIFFs (0.5 mpp), class signal at the cell scale. Mosaics: tiles.csv says where tiles went.

    Example: mrantool demo-data demo/ --slides 12

    Foci of a few cells: mrantool demo-data foci/ --slides 48 --size 4096 --foci 3 --focus-um 25 40

    Mosaic example: mrantool demo-data pcam/ --from-tiles pcam_valid --tile-mpp 0.97 --slides 20 --positives 2
    """
    from mrantool.cohorts.demo_data import demo_data as make_demo_data

    result = run_api(lambda: make_demo_data(
        out, n_slides=slides, seed=seed, size=size, foci=foci, focus_um=focus_um, from_tiles=from_tiles,
        tile_labels=tile_labels, tile_mpp=tile_mpp, tiles_per_slide=tiles_per_slide, positives=positives,
        label_column=label_column, margin=margin))
    if isinstance(result, Path):
        console.print(f"wrote {slides} slides and {result}")
        return
    tiles = result.tiles
    console.print(f"{len(tiles.tiles)} distinct tiles in {tiles.csv} ({tiles.n_rows} rows, {tiles.n_copies} "
                  f"byte-identical copies counted once, {tiles.n_conflicting} rows with conflicting labels left out)",
                  soft_wrap=True, markup=False)
    (cols, rows), (tw, th), (w, h) = result.grid, result.tile_size, result.slide_size
    console.print(f"wrote {result.n_slides} mosaic slides ({cols}x{rows} tiles of {tw}x{th} px, {w}x{h} px at "
                  f"{tile_mpp:g} mpp; {result.n_positive} positive), {result.labels} and {result.placements}",
                  soft_wrap=True, markup=False)


@app.command()
def preview(
    slide: Annotated[Path, typer.Argument(help="A slide file (SVS, NDPI, MRXS, TIFF...) or a PNG/JPEG image.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write.")] = Path("preview.png"),
    preset: Annotated[str, typer.Option(help="Preset: mran, resnet50-trunc, vit-s16, uni, tiny.")] = "mran",
    mpp: Annotated[float | None, typer.Option(help="Scan resolution (microns/px) where the metadata lacks it.")] = None,
    mpp_csv: Annotated[Path | None, typer.Option(help="CSV slide,mpp: per-slide scan resolutions.")] = None,
    target_mpp: Annotated[float | None, typer.Option(help="Override the preset's target resolution.")] = None,
    min_tissue: Annotated[float, typer.Option(help="Keep bags with at least this tissue fraction.")] = 0.1,
) -> None:
    """Draw the tissue outline and the bag/patch grid on the slide's thumbnail.

    Example: mrantool preview CMU-1-Small-Region.svs --preset mran --out preview.png
    """
    from mrantool.slides.mpp_table import read_mpp_table
    from mrantool.tiling.presets import get_preset
    from mrantool.viz.preview import draw_preview

    def go():
        p = get_preset(preset).with_overrides(mpp=target_mpp)
        table = read_mpp_table(mpp_csv) if mpp_csv else None
        return draw_preview(slide, p, out, mpp=mpp, mpp_table=table, min_tissue=min_tissue)

    summary = run_api(go)
    console.print(summary.line(), soft_wrap=True)
    console.print(f"wrote {summary.out}")


@app.command()
def extract(
    slides: Annotated[list[str] | None, typer.Argument(help="Slide files, folders, CSVs with slide_path.")] = None,
    store: Annotated[str | None, typer.Option(help="The Zarr feature store to fill (created when absent).")] = None,
    preset: Annotated[str | None, typer.Option(help="mran, resnet50-trunc, vit-s16, tiny; uni, uni2-h, virchow2, "
                                                    "h-optimus-0/1, prov-gigapath.")] = None,
    encoder: Annotated[str | None, typer.Option(help="A timm model name, or hf-hub:ORG/NAME read from local files, "
                                                     "replacing the preset's architecture.")] = None,
    weights: Annotated[str | None, typer.Option(help="Local weights: a file (safetensors or a state dict), or a hub "
                                                     "model's folder.")] = None,
    pretrained: Annotated[bool | None, typer.Option(help="The preset's hub model: local cache first, a download "
                                                         "only without HF_HUB_OFFLINE.")] = None,
    mpp: Annotated[float | None, typer.Option(help="Scan resolution (microns/px): for PNG/JPEG/plain TIFF images "
                                                   "and slides without it; overrides the metadata.")] = None,
    mpp_csv: Annotated[str | None, typer.Option(help="CSV slide,mpp: per-slide scan resolutions (win over --mpp).")
                       ] = None,
    target_mpp: Annotated[float | None, typer.Option(help="Override the preset's target resolution.")] = None,
    min_tissue: Annotated[float | None, typer.Option(help="Keep bags with at least this tissue fraction.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Patches per encoder batch.")] = None,
    workers: Annotated[int | None, typer.Option(help="DataLoader worker processes reading slides.")] = None,
    shard: Annotated[str | None, typer.Option(help="i/n: this process does the i-th of n deterministic parts.")] = None,
    compile: Annotated[bool | None, typer.Option(help="torch.compile the encoder (faster after ~1 min).")] = None,
    encoder_from: Annotated[str | None, typer.Option(help="A `fit --finetune` run whose encoder to use.")] = None,
    allow_label_overlap: Annotated[bool | None, typer.Option(
        "--allow-label-overlap", help="With --encoder-from: extract slides that trained that encoder anyway.")] = None,
    executor: Annotated[str | None, typer.Option(help="local, or ray (a Ray cluster; see --address).")] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster: auto joins the running one; none starts one.")]
    = None,
    encoders: Annotated[int | None, typer.Option(help="Ray encoder actors (default: one per GPU).")] = None,
    lock_ttl: Annotated[float | None, typer.Option(help="Seconds a dead extractor's locks last (default 600).")]
    = None,
    wait: Annotated[bool | None, typer.Option("--wait", help="Wait for slides other extractors hold.")] = None,
    cache_dir: Annotated[str | None, typer.Option(help="Local copies of slides on object storage.")] = None,
    cache_gb: Annotated[float | None, typer.Option(help="Size bound of --cache-dir (default 50).")] = None,
    quiet: Annotated[bool | None, typer.Option("--quiet", help="Log lines instead of progress bars.")] = None,
    config: Annotated[Path | None, typer.Option(help="TOML file with these options (flags override it).")] = None,
) -> None:
    """Extract patch and cell embeddings of every slide into a Zarr store (resumable; safe to run twice at once).

    Exit status: 0 when every slide is complete, 1 when some failed, 3 when some are still held by another
    extractor (rerun, or pass --wait), 130 when interrupted (finished slides are kept; rerun to resume).

    Example: mrantool extract slides/ --store cohort.zarr --preset mran
    Example: mrantool extract s3://lab/slides/ --store s3://lab/cohort.zarr --executor ray --address auto
    """
    from mrantool.cli_render import extract_progress, results_table
    from mrantool.config import ExtractConfig
    from mrantool.extract.api import extract as run_extract

    cfg = run_api(lambda: ExtractConfig.load(
        config, "extract", slides=slides or None, store=store, preset=preset, encoder=encoder, weights=weights,
        pretrained=pretrained, mpp=mpp, mpp_csv=mpp_csv, target_mpp=target_mpp, min_tissue=min_tissue, device=device,
        batch_size=batch_size, workers=workers, shard=shard, compile=compile, encoder_from=encoder_from,
        allow_label_overlap=allow_label_overlap, quiet=quiet, executor=executor, address=address, encoders=encoders,
        lock_ttl=lock_ttl, wait=wait, cache_dir=cache_dir, cache_gb=cache_gb,
    ))
    with extract_progress(console, cfg.quiet) as progress:
        report = run_api(lambda: run_extract(cfg, progress=progress))
    rows = [[r.slide_id, r.status, r.n_bags, f"{r.seconds:.1f}", r.message] for r in report.results]
    console.print(results_table("extract", ["slide", "status", "bags", "s", "message"], rows))
    rate = report.n_patches / max(report.seconds, 1e-9)
    console.print(
        f"{report.count('done')} done, {report.count('skipped')} already complete, {report.count('busy')} busy, "
        f"{len(report.failed)} failed; {report.n_patches} patches in {report.seconds:.1f}s ({rate:.1f} patches/s)",
        soft_wrap=True,
    )
    if report.interrupted:
        err_console.print(f"interrupted: the {report.count('done')} slide(s) finished are kept, the others left no "
                          f"staging or locks; run the same command again to resume.", soft_wrap=True, markup=False)
        raise typer.Exit(130)
    if report.failed:
        raise typer.Exit(1)
    if report.busy:
        err_console.print(f"{len(report.busy)} slide(s) are held by another extractor and not complete yet; run "
                          "the same command again later, or add --wait to wait for them.", soft_wrap=True,
                          markup=False)
        raise typer.Exit(3)


@app.command("import")
def import_features(
    files: Annotated[list[str], typer.Argument(help="Per-slide .h5 feature files or folders of them.")],
    store: Annotated[str, typer.Option(help="Patch-level store to fill (created when absent).")],
    format: Annotated[str, typer.Option("--format", help="auto, clam, trident or stamp.")] = "auto",
    bag_grid: Annotated[int, typer.Option(help="Group the patch lattice into bags of N x N patches.")] = 4,
    mpp: Annotated[float | None, typer.Option(help="Slide mpp, to turn micrometre coordinates into pixels.")] = None,
    encoder: Annotated[str | None, typer.Option(help="Encoder name to record when the files do not say.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="Log lines instead of progress bars.")] = False,
) -> None:
    """Import CLAM / TRIDENT / STAMP per-slide h5 feature bags into a store (no cell embeddings).

    Example: mrantool import features/*.h5 --store imported.zarr --format auto
    """
    from mrantool.cli_render import extract_progress, results_table
    from mrantool.interop.importers import import_h5

    with extract_progress(console, quiet) as progress:
        report = run_api(lambda: import_h5(files, store, fmt=format, bag_grid=bag_grid, mpp=mpp, encoder=encoder,
                                           progress=progress))
    rows = [[r.slide_id, r.status, r.format or "", r.n_instances, r.n_bags, r.message] for r in report.results]
    console.print(results_table("import", ["slide", "status", "format", "instances", "bags", "message"], rows))
    for note in report.notes:
        console.print(f"note: {note}", soft_wrap=True, markup=False)
    console.print(f"{report.count('done')} imported, {report.count('skipped')} already complete, "
                  f"{len(report.failed)} failed", soft_wrap=True)
    if report.failed:
        raise typer.Exit(1)


@app.command("export")
def export_features(
    store: Annotated[Path, typer.Option(help="The feature store to export.")],
    out: Annotated[Path, typer.Option(help="Folder for the per-slide h5 files.")],
    format: Annotated[str, typer.Option("--format", help="trident (one h5 per slide) or clam (h5_files/ + "
                                                         "pt_files/).")] = "trident",
    slide: Annotated[list[str] | None, typer.Option(help="Export only this slide id (repeatable).")] = None,
    min_tissue: Annotated[float, typer.Option(help="Export patches with at least this tissue fraction.")] = 0.0,
) -> None:
    """Write a store's patch features as CLAM or TRIDENT / Patho-Bench h5 files (level-0 coordinates).

    Example: mrantool export --format trident --store cohort.zarr --out features_mrantool/
    """
    from mrantool.cli_render import results_table
    from mrantool.interop.h5_export import export_h5

    report = run_api(lambda: export_h5(store, out, fmt=format, slides=slide, min_tissue=min_tissue))
    rows = [[r.slide_id, r.status, r.n_patches] for r in report.results]
    console.print(results_table(f"export ({format})", ["slide", "status", "patches"], rows))
    _print_failures(report.failed)
    console.print(f"{len(report.results) - len(report.failed)} slides, {report.n_patches} patches written to {out} "
                  f"({len(report.failed)} failed) in {report.seconds:.1f}s", soft_wrap=True)
    if report.failed:
        raise typer.Exit(1)


@app.command("export-qupath")
def export_qupath(
    run: Annotated[Path, typer.Option(help="A fit run folder (holds attention/<slide>.npz).")],
    store: Annotated[Path, typer.Option(help="The store the run was fit on.")],
    out: Annotated[Path, typer.Option(help="Folder for <slide>.geojson files.")],
    slide: Annotated[list[str] | None, typer.Option(help="Slide id to export (repeatable).")] = None,
    all_slides: Annotated[bool, typer.Option("--all", help="Every slide the run has attention for.")] = False,
    level: Annotated[str, typer.Option(help="patch or cell: one detection per patch or per cell.")] = "patch",
    top: Annotated[int, typer.Option(help="The K most attended items also become annotations.")] = 10,
) -> None:
    """Write a run's attention as QuPath GeoJSON (detections with attention measurements, top-K annotations).

    Example: mrantool export-qupath --run runs/mran --store cohort.zarr --slide synth-003 --out qupath/
    """
    from mrantool.cli_render import results_table
    from mrantool.errors import ConfigError
    from mrantool.interop.qupath import export_qupath as run_export

    def go():
        if bool(slide) == all_slides:
            raise ConfigError("Give --slide ID (repeatable) or --all, not both and not neither.")
        return run_export(run, store, out, slides=None if all_slides else slide, level=level, top=top)

    report = run_api(go)
    rows = [[r.slide_id, r.status, r.n_detections, r.n_annotations, str(r.path or "")] for r in report.results]
    console.print(results_table("QuPath GeoJSON", ["slide", "status", "detections", "annotations", "file"], rows))
    _print_failures(report.failed)
    console.print(f"{len(report.results) - len(report.failed)} GeoJSON file(s) in {out} ({len(report.failed)} "
                  "failed); in QuPath: File > Object data... > Import objects, or drag a file onto its slide",
                  soft_wrap=True)
    if report.failed:
        raise typer.Exit(1)


@app.command()
def info(
    store: Annotated[str, typer.Argument(help="A feature store (path or s3://, gs://, az:// URL).")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Per-slide summary of a store: status, bags, patches, dims, cell grid, mpp, encoder.

    Example: mrantool info cohort.zarr --json
    """
    import json

    from mrantool.cli_render import results_table
    from mrantool.store.reader import FeatureStore

    fs = run_api(lambda: FeatureStore.open(store))
    rows = fs.summary()
    if as_json:
        print(json.dumps({"store": str(store), "identity": fs.identity, "slides": rows}, indent=2, default=str))
        return
    cols = ["slide_id", "status", "n_bags", "n_patches", "dim", "cells", "mpp", "encoder"]
    if any(r.get("error") for r in rows):
        cols.append("error")
    def short(value: object) -> object:
        text = "" if value is None else str(value)
        return text if len(text) <= 60 else text[:57] + "..."

    cells = [[short(r.get(c)) for c in cols] for r in rows]
    console.print(results_table(f"{store} ({fs.identity['preset']}, {len(rows)} slides)", cols, cells))


@app.command()
def check(
    store: Annotated[str, typer.Argument(help="A feature store (path or s3://, gs://, az:// URL).")],
    deep: Annotated[bool, typer.Option("--deep", help="Also read and decode every chunk (slow on big stores).")]
    = False,
    repair: Annotated[bool, typer.Option("--repair", help="Take defective slides out so `extract` redoes them.")]
    = False,
    clear_stale_locks: Annotated[bool, typer.Option(help="Remove locks whose owner is gone or lease expired.")]
    = False,
    lock_ttl: Annotated[float, typer.Option(help="Seconds after which a lock without expiry counts as stale.")]
    = 600.0,
) -> None:
    """Integrity check: metadata, arrays, chunk files (--deep: every value). Exits non-zero on any defect.

    Example: mrantool check cohort.zarr --deep --repair
    """
    from mrantool.store.check import check_store, repair_store, store_warnings
    from mrantool.store.reader import FeatureStore

    if clear_stale_locks:
        cleared = run_api(lambda: FeatureStore.open(store, writable=True, lock_ttl_s=lock_ttl).clear_stale_locks())
        console.print(f"cleared {len(cleared)} stale lock(s)")
    if repair:
        repaired = run_api(lambda: repair_store(store, deep=deep))
        for slide_id, found in repaired.items():
            console.print(f"repaired: took '{slide_id}' out of the store ({'; '.join(found)}); re-run `mrantool "
                          "extract` on its slide file to redo it", soft_wrap=True)
    defects = run_api(lambda: check_store(store, deep=deep))
    for warning in store_warnings(store, lock_ttl_s=lock_ttl):
        console.print(f"warning: {warning}", soft_wrap=True)
    for defect in defects:
        err_console.print(f"defect: {defect}", soft_wrap=True)
    if defects:
        err_console.print(Text.assemble((f"{len(defects)} defect(s)", "bold red"), f" in {store}"), soft_wrap=True)
        raise typer.Exit(1)
    n = len(FeatureStore.open(store).slide_ids())
    level = "deep: every chunk read" if deep else "quick: metadata and chunk files; --deep reads every value"
    console.print(f"{store}: ok ({n} complete slides; {level})", soft_wrap=True)


@app.command()
def fit(
    store: Annotated[str | None, typer.Option(help="Feature store to train on.")] = None,
    labels: Annotated[str | None, typer.Option(help="labels.csv: slide_id,label[,patient_id][,fold].")] = None,
    id_column: Annotated[str | None, typer.Option(help="Labels column of slide ids (default slide_id).")] = None,
    label_column: Annotated[str | None, typer.Option(help="Labels column of labels (default label).")] = None,
    model: Annotated[str | None, typer.Option(help="Head: mran, abmil, gated-abmil, clam-sb, transmil...")] = None,
    out: Annotated[str | None, typer.Option(help="Run folder to write.")] = None,
    folds: Annotated[int | None, typer.Option(help="Cross-validation folds.")] = None,
    repeats: Annotated[int | None, typer.Option(help="Repeat the k-fold split with new shuffles.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Maximum epochs per fold.")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for splits, init, shuffling.")] = None,
    option: Annotated[list[str] | None, typer.Option("--option", "-O", help="Head option KEY=VALUE.")] = None,
    cache_gb: Annotated[float | None, typer.Option(help="RAM budget for cached features.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda ...")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Slides per optimiser step, padded with masks.")] = None,
    parallel_folds: Annotated[int | None, typer.Option(help="Folds trained together (0: all, 1: one by one).")] = None,
    ensemble: Annotated[int | None, typer.Option(help="Models per fold, averaged (own seeds, val slides).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="Log lines instead of progress bars.")] = False,
    config: Annotated[Path | None, typer.Option(help="TOML file with these options (flags override it).")] = None,
    finetune: Annotated[bool, typer.Option(help="Train encoder and MRAN head together on mined bags.")] = False,
    finetune_layers: Annotated[int, typer.Option(help="Trainable last encoder stages/blocks.")] = 1,
    bags_per_slide: Annotated[int, typer.Option(help="Bags re-encoded with gradients per slide and step.")] = 2,
    init_run: Annotated[Path | None, typer.Option(help="Frozen-cache fit run to start fine-tuning from.")] = None,
    end_to_end: Annotated[bool | None, typer.Option(help="Train the store's encoder and the head from pixels.")] = None,
    weights: Annotated[str | None, typer.Option(help="Encoder weights to start from (--end-to-end; with --finetune "
                                                    "the store's own weights file).")] = None,
    encoder_from: Annotated[str | None, typer.Option(help="--end-to-end: start from this run's fold encoders.")] = None,
    glass: Annotated[bool, typer.Option("--glass", help="Whole slides on background glass: MRAN's cells weighted, "
                                        "centred and scaled by tissue (docs/mran.md).")] = False,
) -> None:
    """Train a MIL head on a store with patient-grouped, stratified cross-validation.

    Example: mrantool fit --store cohort.zarr --labels labels.csv --model mran --out runs/mran -O cells=false

    Whole slides (tissue on glass): mrantool fit --store cohort.zarr --labels labels.csv --out runs/mran --glass

    End to end: mrantool fit --end-to-end --store small_cnn.zarr --labels labels.csv --model mran --out runs/e2e
    """
    from mrantool.cli_render import fit_progress, results_table
    from mrantool.config import GLASS_RECIPE, FitConfig, parse_options
    from mrantool.errors import ConfigError
    from mrantool.training.api import fit as run_fit
    from mrantool.training.pixels.e2e import fit_end_to_end

    def load() -> FitConfig:
        cfg = FitConfig.load(config, "fit", store=store, labels=labels, id_column=id_column,
                             label_column=label_column, model=model, out=out, folds=folds,
                             repeats=repeats, epochs=epochs, lr=lr, seed=seed, cache_gb=cache_gb, device=device,
                             threads=threads, batch_size=batch_size, parallel_folds=parallel_folds,
                             ensemble=ensemble, end_to_end=end_to_end, weights=weights, encoder_from=encoder_from)
        if option:
            cfg.options = {**cfg.options, **parse_options(option)}
        if glass:
            cfg = cfg.model_copy(update=GLASS_RECIPE)
        if finetune and cfg.end_to_end:
            raise ConfigError("--finetune and --end-to-end are two ways to train from pixels; pass one of them.")
        return cfg

    cfg = run_api(load)
    if finetune:
        return _finetune(cfg, finetune_layers, bags_per_slide, init_run, quiet)
    train = fit_end_to_end if cfg.end_to_end else run_fit
    with fit_progress(console, quiet) as progress:
        report = run_api(lambda: train(cfg, progress=progress))
    rows = report.table()
    console.print(results_table(f"{report.model} on {cfg.store}", list(rows[0]), [list(r.values()) for r in rows]))
    console.print(f"wrote {report.out} (config.json, metrics.json, predictions.csv, attention/, curves.png, roc.png) "
                  f"in {report.seconds:.0f}s", soft_wrap=True)


def _finetune(cfg, layers: int, bags_per_slide: int, init_run: Path | None, quiet: bool) -> None:
    """`fit --finetune`: fold/epoch progress, then a frozen vs fine-tuned table."""
    from mrantool.cli_render import fit_progress, results_table
    from mrantool.training.pixels.finetune import finetune_from_fit

    with fit_progress(console, quiet) as progress:
        report = run_api(lambda: finetune_from_fit(cfg, init_run=init_run, layers=layers,
                                                   bags_per_slide=bags_per_slide, progress=progress))
    rows = [[f.name, f"{f.best_epoch}/{f.epochs_run}", f"{f.start_metrics.get('auc', float('nan')):.3f}",
             f"{f.metrics.get('auc', float('nan')):.3f}", f"{f.seconds_per_step:.2f}"] for f in report.folds]
    console.print(results_table("fine-tuning (test AUC)", ["fold", "best epoch", "start", "fine-tuned", "s/step"],
                                rows))
    console.print(f"wrote {report.out} (encoder.safetensors: re-extract with `mrantool extract ... --encoder-from "
                  f"{report.out}`; slides that trained it are refused there, see docs/finetune.md)", soft_wrap=True)


@app.command()
def predict(
    run: Annotated[Path, typer.Option(help="A finished fit run folder.")],
    store: Annotated[str, typer.Option(help="Store with the slides to predict (same encoder and geometry).")],
    out: Annotated[Path, typer.Option(help="CSV to write.")] = Path("predictions.csv"),
    device: Annotated[str, typer.Option(help="auto, cpu, cuda ...")] = "auto",
) -> None:
    """Apply a run's fold models (averaged) to every slide of a store (an end-to-end run re-encodes the pixels).

    Example: mrantool predict --run runs/mran --store new_cohort.zarr --out preds.csv
    """
    from mrantool.cli_render import results_table
    from mrantool.training.api import predict as run_predict
    from mrantool.training.pixels.e2e import is_end_to_end_run, predict_end_to_end

    rows = run_api(lambda: (predict_end_to_end if is_end_to_end_run(run) else run_predict)(run, store, out,
                                                                                           device=device))
    cols = list(rows[0]) if rows else ["slide_id"]
    shown = [[f"{v:.3f}" if isinstance(v, float) else v for v in r.values()] for r in rows[:20]]
    console.print(results_table(f"predictions ({len(rows)} slides)", cols, shown))
    console.print(f"wrote {out}")


@app.command()
def heatmap(
    run: Annotated[Path, typer.Option(help="A fit run folder (holds attention/<slide>.npz).")],
    store: Annotated[str, typer.Option(help="The store the run was trained on (path or URL).")],
    slide: Annotated[str, typer.Option(help="Slide id.")],
    out: Annotated[Path, typer.Option(help="PNG to write.")] = Path("heatmap.png"),
    level: Annotated[str, typer.Option(help="bag, patch or cell (cell composes patch and cell weights).")] = "patch",
    top: Annotated[int, typer.Option(help="Also write a gallery of the K most attended patches.")] = 0,
    slide_path: Annotated[Path | None, typer.Option(help="The slide file, when it moved since extraction.")] = None,
) -> None:
    """Draw a slide's attention over its thumbnail at one scale, with a colour bar and the tissue outline.

    Example: mrantool heatmap --run runs/mran --store cohort.zarr --slide synth-003 --level cell --top 8
    """
    from mrantool.viz.heatmap import draw_heatmap

    result = run_api(lambda: draw_heatmap(run, store, slide, out, level=level, top=top, slide_path=slide_path))
    lo, hi = result.value_range
    console.print(f"{slide}: {result.level} attention of {result.head} from {lo:.3g} to {hi:.3g}; "
                  f"wrote {result.out} in {result.seconds:.1f}s", soft_wrap=True)
    for rank, item in enumerate(result.top, 1):
        console.print(f"  #{rank} bag {item.bag} patch {item.patch} at ({item.x}, {item.y}) score {item.score:.4f}")
    if result.gallery:
        console.print(f"wrote {result.gallery}")


@app.command()
def sweep(
    spec: Annotated[Path, typer.Argument(help="Sweep TOML: [base] fit config, [grid] and/or [[variant]] tables.")],
    out: Annotated[Path, typer.Option(help="Sweep folder (runs/, results.csv, summary.md, metric.png).")],
    workers: Annotated[int | None, typer.Option(help="Parallel workers (each loads the features once; default 1).")]
    = None,
    id_column: Annotated[str | None, typer.Option(help="Labels column of slide ids (overrides the spec's base).")
                         ] = None,
    label_column: Annotated[str | None, typer.Option(help="Labels column of labels (overrides the spec's base).")
                            ] = None,
    executor: Annotated[str, typer.Option(help="local (worker processes), or ray (Ray tasks on a cluster).")]
    = "local",
    address: Annotated[str | None, typer.Option(help="Ray cluster: auto joins the running one.")] = None,
    cpus_per_run: Annotated[float, typer.Option(help="Ray: CPUs each run declares (and its torch threads).")] = 1.0,
    gpus_per_run: Annotated[float, typer.Option(help="Ray: GPU fraction each run declares (e.g. 0.25).")] = 0.0,
) -> None:
    """Run an ablation sweep in parallel, resumably; rank the variants with paired tests against a baseline.

    Example: mrantool sweep examples/sweep.toml --out sweeps/heads --workers 2
    Example: mrantool sweep sweep.toml --out /shared/sweeps/heads --executor ray --address auto --gpus-per-run 0.25
    """
    from mrantool.cli_render import results_table
    from mrantool.errors import ConfigError
    from mrantool.sweep.ray_pool import RayResources
    from mrantool.sweep.runner import run_sweep

    def resources() -> RayResources | None:
        if executor not in ("local", "ray"):
            raise ConfigError(f"--executor {executor!r} is not one of local, ray.")
        if executor == "local":
            if address is not None:
                raise ConfigError("--address names a Ray cluster; pass it with --executor ray.")
            return None
        return RayResources(address, workers, cpus_per_run, gpus_per_run)

    def progress(event: str, info: dict) -> None:
        if event == "start":
            where = "Ray" if info["executor"] == "ray" else f"{info['workers']} worker(s)"
            console.print(f"{info['n_todo']} of {info['n_runs']} runs to do on {where} x {info['threads']} "
                          "thread(s)")
        elif event == "run_end":
            error = f": {info['error']}" if info.get("error") else ""
            console.print(f"[{info['index']}/{info['n_todo']}] {info['name']} {info['status']} "
                          f"({info['seconds']:.0f}s){error}", markup=False, soft_wrap=True)

    columns = {k: v for k, v in (("id_column", id_column), ("label_column", label_column)) if v is not None}
    result = run_api(lambda: run_sweep(spec, out, workers=1 if workers is None else workers, progress=progress,
                                       base=columns, ray=resources()))
    rows = result.table()
    if rows:
        table = results_table(f"sweep ranked by {result.metric}", list(rows[0]), [list(r.values()) for r in rows])
        console.print(table)
    for note in result.notes:
        console.print(f"note: {note}", soft_wrap=True, markup=False)
    console.print(f"{result.count('ran')} ran, {result.count('skipped')} already finished, {result.count('error')} "
                  f"failed in {result.seconds:.0f}s; wrote {out}/summary.md", soft_wrap=True)
    if result.count("error"):
        raise typer.Exit(1)


index_app = typer.Typer(help="Build or grow a FAISS index of a store's embeddings.", no_args_is_help=True)
app.add_typer(index_app, name="index")


@index_app.command("build")
def index_build(
    store: Annotated[str, typer.Option(help="Feature store to index (path or URL).")],
    out: Annotated[Path, typer.Option(help="Index folder to write.")],
    level: Annotated[str, typer.Option(help="patch or cell embeddings.")] = "patch",
    kind: Annotated[str, typer.Option(help="flat (exact), hnsw, hnsw-sq8 or ivfpq (the last two re-rank exactly)."
                                      )] = "hnsw",
    min_tissue: Annotated[float, typer.Option(help="Index patches with at least this tissue fraction.")] = 0.25,
) -> None:
    """Index every tissue patch of a store for cosine-similarity search.

    Example: mrantool index build --store cohort.zarr --out cohort.index --kind hnsw
    """
    import time

    from mrantool.retrieval.cohort import build_index

    t0 = time.perf_counter()
    index = run_api(lambda: build_index(store, out, level=level, kind=kind, min_tissue=min_tissue))
    console.print(f"indexed {index.count} {level} embeddings of {len(index.slide_names)} slides ({index.kind}, "
                  f"{index.dim}-d) in {time.perf_counter() - t0:.1f}s; wrote {out}", soft_wrap=True)


@index_app.command("add")
def index_add(
    index: Annotated[Path, typer.Option(help="An index folder.")],
    store: Annotated[str, typer.Option(help="The store, with newly extracted slides (path or URL).")],
) -> None:
    """Append slides extracted since the index was built, without rebuilding it.

    Example: mrantool index add --index cohort.index --store cohort.zarr
    """
    from mrantool.retrieval.cohort import add_new_slides

    new = run_api(lambda: add_new_slides(index, store))
    console.print(f"added {len(new)} slide(s) to {index}" + (f": {', '.join(new)}" if new else ""), soft_wrap=True)


@app.command()
def query(
    index: Annotated[Path, typer.Option(help="An index folder from `mrantool index build`.")],
    store: Annotated[str | None, typer.Option(help="The store the index was built from, path or URL (default: the "
                                                   "one index.json records).")] = None,
    slide: Annotated[str | None, typer.Option(help="With --run: query with the slide's most attended patches.")] = None,
    run: Annotated[Path | None, typer.Option(help="A fit run folder (attention, labels).")] = None,
    top_attended: Annotated[int, typer.Option(help="How many of the slide's most attended patches.")] = 3,
    image: Annotated[Path | None, typer.Option(help="A tile image at the store's mpp, encoded like the store.")] = None,
    patch: Annotated[str | None, typer.Option(help="SLIDE:BAG:PATCH of a stored patch.")] = None,
    k: Annotated[int, typer.Option("-k", help="Neighbours per query.")] = 8,
    exclude_same_slide: Annotated[bool, typer.Option(help="Skip hits from the query's own slide.")] = False,
    weights: Annotated[Path | None, typer.Option(help="Encoder weights file, for --image on such a store.")] = None,
    labels: Annotated[Path | None, typer.Option(help="labels.csv to show each hit's slide label.")] = None,
    gallery: Annotated[Path | None, typer.Option(help="PNG of each query beside its neighbours.")] = Path("query.png"),
) -> None:
    """Find the patches most similar to a query patch, a slide's most attended patches, or an image tile.

    Example: mrantool query --index cohort.index --slide synth-003 --run runs/mran -k 5
    """
    from mrantool.cli_render import results_table
    from mrantool.errors import ConfigError
    from mrantool.retrieval import similar

    def go():
        chosen = [name for name, v in (("--slide", slide), ("--image", image), ("--patch", patch)) if v]
        if len(chosen) != 1:
            raise ConfigError("Give exactly one of --slide (with --run), --image or --patch.")
        fs = similar.open_store(index, store)
        if slide:
            if run is None:
                raise ConfigError("--slide needs --run: the run's attention picks the slide's query patches.")
            q = similar.from_top_attended(fs, run, slide, top_attended)
        elif image:
            q = similar.from_image(fs, image, weights)
        else:
            q = similar.from_patch_spec(fs, patch)
        return similar.run_query(index, fs.path, q, k=k, exclude_same_slide=exclude_same_slide, gallery=gallery,
                                 labels_csv=labels, run_dir=run)

    result = run_api(go)
    cols = ["query_name", "rank", "slide", "label", "bag", "patch", "x", "y", "similarity"]
    rows = [[f"{r[c]:.4f}" if c == "similarity" else r[c] for c in cols] for r in result.rows]
    console.print(results_table("similar patches", ["query", *cols[1:]], rows))
    if result.gallery:
        console.print(f"wrote {result.gallery}")


@app.command()
def view(
    store: Annotated[Path, typer.Option(help="The feature store whose slides to show.")],
    run: Annotated[Path | None, typer.Option(help="A fit run: predictions and attention overlays.")] = None,
    index: Annotated[Path | None, typer.Option(help="A patch index (`mrantool index build`): click to find "
                                                    "similar patches.")] = None,
    labels: Annotated[Path | None, typer.Option(help="labels.csv, for label columns without a run.")] = None,
    slides: Annotated[list[str] | None, typer.Option(help="Slide files/folders/CSV, when they moved since "
                                                          "extraction (repeatable).")] = None,
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    host: Annotated[str, typer.Option(help="Address to listen on; the default serves this computer only.")] =
        "127.0.0.1",
) -> None:
    """Serve a browser viewer: slides with attention overlays, tissue outline, click a patch to find similar ones.

    Example: mrantool view --store demo/store.zarr --run demo/runs/mran --index demo/index
    """
    from mrantool.web.server import LOCAL_HOSTS, build_viewer, check_port, serve, url_of

    viewer = run_api(lambda: build_viewer(store, run=run, index=index, labels=labels, slides=slides))
    run_api(lambda: check_port(host, port))
    if host not in LOCAL_HOSTS:
        err_console.print(f"warning: listening on {host}: anyone who can reach this machine on port {port} can see "
                          "the slides.", soft_wrap=True, markup=False)
    console.print(f"viewer of {store} ({len(viewer.cohort.slide_ids())} slides) at {url_of(host, port)} "
                  "(Ctrl+C to stop)", soft_wrap=True, markup=False)
    run_api(lambda: serve(viewer, host, port))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
