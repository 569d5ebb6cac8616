"""Every command as a user types it (typer's CliRunner, in-process), on one small cohort made through the CLI.

The slides and labels live under a folder named `[batch2]`: rich markup used to eat such names in messages.
Bad inputs a hostile tester tried are here too: each must print one sentence naming the file and the fix (exit 1,
no traceback), and nothing already written may be lost.
"""

from __future__ import annotations

import csv
import errno
import json
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mrantool.cli import app
from mrantool.cohorts.synthetic import read_foci
from mrantool.config import GLASS_RECIPE
from mrantool.slides.writer import write_pyramid_tiff
from mrantool.store import FeatureStore
from mrantool.training.runs import load_fold_models
from tests.conftest import tissue_image

TINY = ["--preset", "tiny", "--workers", "0", "--batch-size", "32", "--device", "cpu", "--quiet"]
FIT_TOML = """
model = "gated-abmil"   # the --model flag overrides this
epochs = 2
min_epochs = 1
lr = 0.01
device = "cpu"
threads = 1
options = {attn_dim = 8}
"""


def cli(*args: object) -> tuple[int, str]:
    """Exit code and everything printed (stdout and stderr)."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def one_line(output: str) -> str:
    """Messages are soft-wrapped; CliRunner's terminal is 80 columns wide, so join lines to search them."""
    return " ".join(output.split())


def ok(*args: object) -> str:
    code, out = cli(*args)
    assert code == 0, out
    return out


def refused(*args: object) -> str:
    """Exit 1 with one `error:` sentence; returns the output with line breaks removed."""
    code, out = cli(*args)
    assert code == 1, out
    assert out.count("error:") == 1, out
    return one_line(out)


def write_labels(path: Path, rows: list[tuple[str, ...]], header: str = "slide_id,label", bom: bool = False) -> Path:
    text = header + "\n" + "".join(",".join(r) + "\n" for r in rows)
    path.write_text(("\ufeff" if bom else "") + text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def flow(tmp_path_factory) -> dict[str, Path]:
    """4 slides (2 per class) -> extract -> fit abmil (TOML + flags + -O) -> index."""
    root = tmp_path_factory.mktemp("cli")
    lab = root / "lab" / "[batch2]"
    lab.mkdir(parents=True)
    for i in range(4):
        write_pyramid_tiff(lab / f"a-{i}.tif", tissue_image(2048, seed=i), mpp=0.5)
    labels = write_labels(lab / "labels.csv", [(f"a-{i}", "tumour" if i % 2 else "normal") for i in range(4)])
    store = root / "s.zarr"
    out = ok("extract", lab, "--store", store, *TINY)
    assert "4 done, 0 already complete" in out
    (root / "fit.toml").write_text(FIT_TOML)
    run = root / "run"
    fitted = ok("fit", "--store", store, "--labels", labels, "--model", "abmil", "--out", run, "--folds", "2",
                "--config", root / "fit.toml", "-O", "hidden=16", "--quiet", "--seed", "1")
    assert "fold_1: best epoch" in fitted and f"wrote {run} (config.json" in one_line(fitted)
    index = root / "idx"
    ok("index", "build", "--store", store, "--out", index, "--kind", "flat")
    return {"root": root, "lab": lab, "labels": labels, "store": store, "run": run, "index": index}


# --- every command, its main options, the files it writes and what it prints ----------------------------------


def test_fit_merges_toml_flags_and_options(flow) -> None:
    config = json.loads((flow["run"] / "config.json").read_text())
    assert config["model"] == "abmil"  # flag over TOML
    assert config["config"]["epochs"] == 2 and config["config"]["lr"] == 0.01 and config["config"]["seed"] == 1
    assert config["head_options"]["hidden"] == 16 and config["head_options"]["attn_dim"] == 8  # -O merged in
    metrics = json.loads((flow["run"] / "metrics.json").read_text())
    assert [f["name"] for f in metrics["folds"]] == ["fold_0", "fold_1"]
    for name in ("predictions.csv", "curves.png", "roc.png", "fold_0/model.safetensors", "attention/a-0.npz"):
        assert (flow["run"] / name).is_file(), name
    again = refused("fit", "--store", flow["store"], "--labels", flow["labels"], "--out", flow["run"], "--folds", "2",
                    "--config", flow["root"] / "fit.toml")
    assert "already holds a finished fit run" in again


def test_fit_ensemble_writes_every_member_and_predict_averages_them(flow, tmp_path) -> None:
    base = ("fit", "--store", flow["store"], "--labels", flow["labels"], "--config", flow["root"] / "fit.toml",
            "--folds", "2", "--quiet")
    ok(*base, "--out", tmp_path / "ens", "--ensemble", "2")
    for name in ("fold_0/model.safetensors", "fold_0/member_1/model.safetensors", "fold_1/member_1/head.json"):
        assert (tmp_path / "ens" / name).is_file(), name
    assert not (tmp_path / "ens" / "fold_0" / "member_2").exists()
    ok("predict", "--run", tmp_path / "ens", "--store", flow["store"], "--out", tmp_path / "p.csv")
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 5
    assert "ensemble 0 (use 1 or more models per fold)" in one_line(refused(*base, "--out", tmp_path / "e0",
                                                                            "--ensemble", "0"))


def test_info_check_and_extract_resume(flow) -> None:
    table = ok("info", flow["store"])
    assert all(f"a-{i}" in table for i in range(4))
    code, out = cli("info", flow["store"], "--json")
    rows = json.loads(out)["slides"]
    assert code == 0 and {r["slide_id"]: r["status"] for r in rows} == {f"a-{i}": "complete" for i in range(4)}
    assert "ok (4 complete slides; quick" in one_line(ok("check", flow["store"]))
    assert "ok (4 complete slides; deep" in one_line(ok("check", flow["store"], "--deep"))
    resumed = ok("extract", flow["lab"], "--store", flow["store"], *TINY)
    assert "0 done, 4 already complete" in resumed


def test_predict_writes_every_slide(flow, tmp_path) -> None:
    out = ok("predict", "--run", flow["run"], "--store", flow["store"], "--out", tmp_path / "p" / "preds.csv",
             "--device", "cpu")
    rows = list(csv.DictReader((tmp_path / "p" / "preds.csv").open()))
    assert [r["slide_id"] for r in rows] == [f"a-{i}" for i in range(4)]
    assert all(r["predicted"] in ("normal", "tumour") and float(r["prob_tumour"]) >= 0 for r in rows)
    assert "predictions (4 slides)" in out
    folder = refused("predict", "--run", flow["run"], "--store", flow["store"], "--out", tmp_path)
    assert f"--out {tmp_path} is a folder" in folder


def test_heatmap_and_gallery(flow, tmp_path) -> None:
    out = one_line(ok("heatmap", "--run", flow["run"], "--store", flow["store"], "--slide", "a-1", "--level", "patch",
                      "--top", "2", "--out", tmp_path / "h.png"))
    assert (tmp_path / "h.png").is_file() and (tmp_path / "h_top.png").is_file()
    assert "a-1: patch attention of abmil" in out and "#2 bag" in out
    (flow["run"] / "x.npz").write_bytes(b"not an npz")  # run/attention/../x.npz: used to be opened first
    outside = refused("heatmap", "--run", flow["run"], "--store", flow["store"], "--slide", "../x",
                      "--out", tmp_path / "x.png")
    (flow["run"] / "x.npz").unlink()
    assert "Invalid slide id '../x': it contains a path separator" in outside


def test_index_add_and_query_without_store(flow, tmp_path) -> None:
    out = ok("query", "--index", flow["index"], "--patch", "a-3:0:5", "-k", "3", "--gallery", tmp_path / "q.png")
    assert "a-3:0:5" in out and (tmp_path / "q.png").is_file()  # the store came from index.json
    huge = ok("query", "--index", flow["index"], "--patch", "a-3:0:5", "-k", "100000", "--gallery", tmp_path / "b.png")
    assert huge.count("a-3:0:5") > 3  # every indexed patch, no padding rows
    labels = write_labels(tmp_path / "bom.csv", [(f"a-{i}", "T" if i % 2 else "N") for i in range(4)], bom=True)
    shown = ok("query", "--index", flow["index"], "--patch", "a-3:0:5", "-k", "2", "--labels", labels,
               "--gallery", tmp_path / "l.png")
    assert " T " in shown or "│ T" in shown
    missing = refused("query", "--index", flow["index"], "--patch", "a-3:0:5", "--labels", tmp_path / "nope.csv")
    assert "nope.csv does not exist" in missing
    emoji = refused("query", "--index", flow["index"], "--patch", "zz:a:1")  # ':a:' used to print as an emoji
    assert "got 'zz:a:1'" in emoji
    moved, index = tmp_path / "moved.zarr", tmp_path / "idx"  # a moved copy of the store is the same store
    shutil.copytree(flow["store"], moved)
    shutil.copytree(flow["index"], index)
    write_pyramid_tiff(tmp_path / "a-4.tif", tissue_image(2048, seed=4), mpp=0.5)
    ok("extract", tmp_path / "a-4.tif", "--store", moved, *TINY)
    assert "added 1 slide(s) to" in ok("index", "add", "--index", index, "--store", moved)
    assert "a-4:0:0" in ok("query", "--index", index, "--store", moved, "--patch", "a-4:0:0", "-k", "1",
                           "--gallery", tmp_path / "m.png")


def test_query_and_add_refuse_an_index_of_another_store(flow, tmp_path) -> None:
    other = tmp_path / "other.zarr"
    shutil.copytree(flow["store"], other)
    fs = FeatureStore.open(other, writable=True)  # same preset and slide names, a-0 extracted again
    old = fs.slide("a-0")
    writer = fs.begin_slide("a-0", old.n_bags, {**old.provenance, "extracted_at": None})
    writer.write(0, old.coords[:], old.patch_tissue[:], old.patch_emb[:] * 0.5, old.cell_emb[:])
    writer.commit()
    for args in (("query", "--index", flow["index"], "--store", other, "--patch", "a-0:0:0"),
                 ("index", "add", "--index", flow["index"], "--store", other)):
        message = refused(*args)
        assert "holds other extractions of 1 of its slides (a-0)" in message and f"--store {flow['store']}" in message


def test_preview_demo_data_and_import(flow, tmp_path) -> None:
    out = ok("preview", flow["lab"] / "a-0.tif", "--preset", "tiny", "--out", tmp_path / "pre.png")
    assert "a-0: 2 mpp" in out and (tmp_path / "pre.png").is_file()
    made = ok("demo-data", tmp_path / "cohort", "--slides", "2", "--size", "512", "--seed", "3", "--foci", "2",
              "--focus-um", "25", "40")
    assert "wrote 2 slides" in made and len(list((tmp_path / "cohort").glob("*.tiff"))) == 2
    radii_um = [r * 0.5 for discs in read_foci(tmp_path / "cohort").values() for _, _, r in discs]
    assert len(radii_um) == 6 and min(radii_um) >= 12 and max(radii_um) <= 33  # 2 foci of 3 lobes, 25-40 um
    import h5py

    with h5py.File(tmp_path / "TCGA-X.h5", "w") as h5:
        h5.create_dataset("features", data=np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32))
        h5.create_dataset("coords", data=np.stack(np.meshgrid(np.arange(5), np.arange(4)), -1).reshape(-1, 2) * 256)
    imported = ok("import", tmp_path / "TCGA-X.h5", "--store", tmp_path / "i.zarr", "--quiet")
    assert "1 imported" in imported and FeatureStore.open(tmp_path / "i.zarr").slide_ids() == ["TCGA-X"]


def test_sweep_and_its_hints(flow, tmp_path) -> None:
    spec = tmp_path / "sweep.toml"
    spec.write_text(f'[base]\nstore = "{flow["store"]}"\nlabels = "{flow["labels"]}"\nfolds = 2\nepochs = 1\n'
                    'min_epochs = 1\ndevice = "cpu"\n[[variant]]\nname = "mean"\nmodel = "mean"\n'
                    '[[variant]]\nname = "max"\nmodel = "max"\n')
    out = ok("sweep", spec, "--out", tmp_path / "sw")
    assert "2 ran, 0 already finished, 0 failed" in one_line(out) and (tmp_path / "sw" / "summary.md").is_file()
    assert "0 ran, 2 already finished" in one_line(ok("sweep", spec, "--out", tmp_path / "sw"))
    bad = tmp_path / "bad.toml"
    bad.write_text(spec.read_text() + "[grid]\nnot_a_key = [1, 2]\n")
    assert "[grid]: unknown key 'not_a_key'" in refused("sweep", bad, "--out", tmp_path / "sw2")


def test_fit_glass_trains_with_the_glass_recipe_and_refusals_name_it(flow, tmp_path) -> None:
    fit = ("fit", "--store", flow["store"], "--labels", flow["labels"], "--folds", "2", "--epochs", "1",
           "--device", "cpu", "--threads", "1", "--quiet", "--glass")
    assert "fold_1: best epoch" in ok(*fit, "--model", "mran", "--out", tmp_path / "glass")
    config = json.loads((tmp_path / "glass" / "config.json").read_text())["config"]
    assert [config[k] for k in GLASS_RECIPE] == [True, True, True]
    heads = load_fold_models(tmp_path / "glass", None, torch.device("cpu"))
    assert all(h.cell_spread.numel() > 0 for _, h, _ in heads)  # the spreads reached the saved heads
    assert "`fit --glass` sets it" in refused(*fit, "--model", "abmil", "--out", tmp_path / "abmil")
    assert "or drop --glass" in refused(*fit, "--end-to-end", "--out", tmp_path / "e2e")


def test_demo_runs_the_whole_flow(tmp_path) -> None:
    out = ok("demo", "--out", tmp_path / "demo", "--preset", "tiny", "--slides", "4", "--size", "1024", "--folds", "2",
             "--epochs", "2")
    assert "demo finished" in out
    assert (tmp_path / "demo" / "runs" / "mran" / "metrics.json").is_file()
    assert list((tmp_path / "demo").glob("heatmap_*.png")) and (tmp_path / "demo" / "index").is_dir()


def test_fit_finetune_prints_progress_and_reextract_checks_labels(flow, tmp_path) -> None:
    """Also `extract --encoder-from`: covered end to end in tests/test_finetune.py."""
    code, out = cli("fit", "--finetune", "--store", flow["store"], "--labels", flow["labels"], "--out",
                    tmp_path / "ft", "--folds", "2", "--epochs", "1", "--device", "cpu", "--threads", "1", "--quiet")
    assert code == 0, out
    assert "fold_0: best epoch" in out and "fine-tuning (test AUC)" in out


def test_the_command_reference_matches_every_help_text() -> None:
    """docs/cli.md says it is generated from `--help`; a new option left out of it (as --ensemble once was) fails
    here. Refresh a block with `COLUMNS=100 mrantool COMMAND --help`, trailing spaces cut."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    blocks = re.findall(r"## (mrantool[\w\- ]*)\n\n```\n(.*?)\n```", text, flags=re.S)
    assert {cmd for cmd, _ in blocks} >= {"mrantool", "mrantool fit", "mrantool extract", "mrantool sweep"}
    for cmd, block in blocks:
        shown = CliRunner().invoke(app, [*cmd.split()[1:], "--help"], env={"COLUMNS": "100", "NO_COLOR": "1"},
                                terminal_width=100).output
        assert "\n".join(line.rstrip() for line in shown.splitlines()).strip("\n") == block.strip("\n"), cmd


# --- bad inputs: one sentence naming the file and the fix -------------------------------------------------


def test_markup_in_paths_is_printed_verbatim(flow, tmp_path) -> None:
    bad = write_labels(flow["lab"] / "bad.csv", [("a-0", "x")], header="slide,label")
    message = refused("fit", "--store", flow["store"], "--labels", bad, "--out", tmp_path / "r")
    assert "lab/[batch2]/bad.csv lacks column(s) slide_id" in message


def test_os_and_option_errors(flow, tmp_path) -> None:
    store, labels = flow["store"], flow["labels"]
    fit = ("fit", "--store", store, "--labels", labels, "--config", flow["root"] / "fit.toml", "--quiet",
           "--folds", "2")
    assert "is a folder; pass the CSV file itself" in refused("fit", "--store", store, "--labels", tmp_path,
                                                              "--out", tmp_path / "r")
    assert "is a folder; pass the TOML file itself" in refused(*fit[:5], "--config", tmp_path, "--out",
                                                               tmp_path / "r")
    (tmp_path / "file").write_text("x")
    assert f"--out {tmp_path / 'file'} is a file" in refused(*fit, "--out", tmp_path / "file")
    assert "seed -1 (use 0 or more)" in refused(*fit, "--out", tmp_path / "r", "--seed", "-1")
    toml = tmp_path / "inf.toml"
    toml.write_text((flow["root"] / "fit.toml").read_text().replace("lr = 0.01", "lr = inf"))
    assert "lr inf (use a positive, finite learning rate)" in refused(*fit[:5], "--config", toml, "--out",
                                                                      tmp_path / "r")
    one = flow["lab"] / "a-0.tif"
    assert "'workers': Input should be greater than or equal to 0" in refused(
        "extract", one, "--store", tmp_path / "w.zarr", "--workers", "-1")
    assert "'target_mpp': Input should be greater than 0" in refused(
        "extract", one, "--store", tmp_path / "w.zarr", "--target-mpp", "0")
    assert "'min_tissue': Input should be greater than or equal to 0" in refused(
        "extract", one, "--store", tmp_path / "w.zarr", "--min-tissue", "-1")
    message = refused("extract", one, "--store", tmp_path / "file" / "s.zarr", *TINY)
    assert f"Cannot create store {tmp_path / 'file' / 's.zarr'}: {tmp_path / 'file'} is a file, not a folder" in message
    assert not (tmp_path / "w.zarr").exists()


def test_a_196_megapixel_image_is_refused_without_decoding_it(flow, tmp_path) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    big = tmp_path / "big.png"  # a PNG header claiming 14000 x 14000 px (196 MP), no pixels behind it
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 14000, 14000, 8, 2, 0, 0, 0))
                    + chunk(b"IEND", b""))
    message = refused("query", "--index", flow["index"], "--image", big)
    assert f"--image {big} has more pixels than it is safe to decode" in message
    assert "crop one patch-sized tile" in message


def test_read_only_store_and_full_disk(flow, tmp_path, monkeypatch) -> None:
    import zarr.storage._local as local

    store = tmp_path / "s.zarr"
    shutil.copytree(flow["store"], store)
    real_write = Path.write_bytes

    def read_only(self: Path, data: bytes) -> int:
        if str(self).startswith(str(store)):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    message = refused("extract", flow["lab"], "--store", store, *TINY)
    assert f"Cannot write to store {store}: the file system is read-only" in message
    monkeypatch.undo()

    slides = tmp_path / "in"
    slides.mkdir()
    for name in ("b-0", "b-1"):
        shutil.copy(flow["lab"] / "a-0.tif", slides / f"{name}.tif")
    real_put = local._put

    def full_disk(path, value, exclusive=False):  # the lowest layer: zarr's file write
        if "b-1." in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_put(path, value, exclusive=exclusive)

    monkeypatch.setattr(local, "_put", full_disk)
    message = refused("extract", slides, "--store", store, *TINY)
    assert f"Cannot write to store {store}: the disk is full" in message
    assert "what was written before is kept" in message
    monkeypatch.undo()
    fs = FeatureStore.open(store)
    assert fs.slide_ids() == ["a-0", "a-1", "a-2", "a-3", "b-0"] and not list((store / "staging").iterdir())
    assert "ok (5 complete slides" in one_line(ok("check", store, "--deep"))


def test_damaged_store_is_named_refused_and_redone(flow, tmp_path) -> None:
    store = tmp_path / "s.zarr"
    shutil.copytree(flow["store"], store)
    slides = store / "slides"
    (slides / "a-0" / "zarr.json").write_text("null")
    (slides / "a-1" / "zarr.json").write_text("{x")
    chunk = next(p for p in (slides / "a-2" / "patch_emb" / "c").rglob("*") if p.is_file())
    chunk.unlink()
    garbage = next(p for p in (slides / "a-3" / "cell_emb" / "c").rglob("*") if p.is_file())
    garbage.write_bytes(b"\x00garbage" * 10)
    code, out = cli("check", store)
    text = one_line(out)
    assert code == 1 and all(f"slide 'a-{i}'" in text for i in range(3)) and "slide 'a-3'" not in text
    code, out = cli("check", store, "--deep")
    assert code == 1 and "slide 'a-3': cell_emb has an unreadable chunk" in one_line(out)
    info = ok("info", store, "--json")
    assert "defective" in info
    message = refused("fit", "--store", store, "--labels", flow["labels"], "--out", tmp_path / "r",
                      "--config", flow["root"] / "fit.toml")
    assert "defective slide(s)" in message and "'a-0'" in message and "re-run `mrantool extract`" in message
    assert "'a-2'" in refused("predict", "--run", flow["run"], "--store", store, "--out", tmp_path / "p.csv")
    assert not (tmp_path / "p.csv").exists()
    assert "a-2" in refused("heatmap", "--run", flow["run"], "--store", store, "--slide", "a-2", "--out",
                            tmp_path / "h.png")
    redo = ok("extract", flow["lab"], "--store", store, *TINY)
    assert "3 done, 1 already complete" in redo  # a-3's overwritten chunk needs --deep to be seen
    code, out = cli("check", store, "--deep", "--repair")
    assert "repaired: took 'a-3' out of the store" in one_line(out) and code == 0, out
    assert "1 done, 3 already complete" in ok("extract", flow["lab"], "--store", store, *TINY)
    assert "ok (4 complete slides; deep" in one_line(ok("check", store, "--deep"))


def test_labels_that_would_train_wrong(flow, tmp_path) -> None:
    base = ("fit", "--store", flow["store"], "--config", flow["root"] / "fit.toml", "--folds", "2", "--quiet")
    nan = write_labels(tmp_path / "nan.csv", [("a-0", "normal"), ("a-1", "NaN"), ("a-2", "normal"), ("a-3", "x")])
    assert "label 'NaN' on line(s) 3: a missing-value marker" in refused(*base, "--labels", nan, "--out",
                                                                         tmp_path / "r1")
    one_class = write_labels(tmp_path / "f.csv", [("a-0", "normal", "0"), ("a-1", "tumour", "1"),
                                                  ("a-2", "normal", "0"), ("a-3", "tumour", "1")],
                             header="slide_id,label,fold")
    assert "would train without them" in refused(*base, "--labels", one_class, "--out", tmp_path / "r2")
    folds = write_labels(tmp_path / "g.csv", [("a-0", "normal", "0"), ("a-1", "tumour", "1"),
                                              ("a-2", "normal", "2"), ("a-3", "tumour", "2")],
                         header="slide_id,label,fold")
    out = one_line(ok(*base, "--labels", folds, "--out", tmp_path / "r3"))
    assert "AUC is undefined there; mean AUC is over the other 1 of 3 folds" in out
    metrics = json.loads((tmp_path / "r3" / "metrics.json").read_text())
    assert metrics["n_folds_used"]["auc"] == 1 and metrics["n_folds_used"]["accuracy"] == 3


def test_slide_lists_that_used_to_abort_or_do_nothing(flow, tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    assert "No slide files found in" in refused("extract", tmp_path / "empty", "--store", tmp_path / "e.zarr", *TINY)
    assert not (tmp_path / "e.zarr").exists()
    names = tmp_path / "names"
    names.mkdir()
    small = tissue_image(1024, seed=5)
    for name in ("good.tif", "Präparat-ä.tif", "..tiff", "x" * 201 + ".tif"):
        write_pyramid_tiff(names / name, small, mpp=0.5)
    code, out = cli("extract", names, "--store", tmp_path / "n.zarr", *TINY)
    text = one_line(out)
    assert code == 1 and "2 done" in text and "2 failed" in text
    assert "Invalid slide id '.': it starts with a dot" in text and "longer than 200 bytes" in text
    assert FeatureStore.open(tmp_path / "n.zarr").slide_ids() == ["Präparat-ä", "good"]
    case = tmp_path / "case"
    case.mkdir()
    write_pyramid_tiff(case / "GOOD.tif", small, mpp=0.5)
    code, out = cli("extract", case, "--store", tmp_path / "n.zarr", *TINY)
    assert code == 1 and "differs only in case from 'good'" in one_line(out)
    write_pyramid_tiff(case / "good.tif", small, mpp=0.5)
    assert "differ only in case" in refused("extract", case, "--store", tmp_path / "m.zarr", *TINY)
