"""Label leakage through a fine-tuned encoder: which slides to extract were training slides of its fine-tuning.

`fit --finetune` trains the encoder on the labels of each fold's training and validation slides; its encoder.json
lists them (`label_slides`: slide id and file fingerprint). Extracting those same slides with that encoder and
cross-validating on the result puts slides whose labels shaped the features into test folds: the metrics are
optimistic. A slide matches by id, or by file (size and hash of the first MiB; hashed only when the size matches).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mrantool.errors import SlideError
from mrantool.extract.inputs import SlideInput
from mrantool.store.fingerprint import file_fingerprint

FIX = ("extract only slides outside the fine-tuning cohort (e.g. an external test set), or pass "
       "--allow-label-overlap to extract anyway (each such slide's provenance then says so and `fit` warns)")


def label_slides(run_dir: str | Path) -> list[dict[str, Any]]:
    """The fine-tuning run's label slides (empty for runs written before they were recorded)."""
    meta = json.loads((Path(run_dir) / "encoder.json").read_text())
    return list(meta.get("label_slides", []))


def overlapping(slides: list[SlideInput], seen: list[dict[str, Any]]) -> list[SlideInput]:
    """The slides among `slides` whose labels the encoder saw: same id, or same file contents."""
    ids = {entry["slide_id"] for entry in seen}
    by_size: dict[int, set[str]] = {}
    for entry in seen:
        fp = entry.get("fingerprint") or {}
        if "size" in fp and "sha256_first_mib" in fp:
            by_size.setdefault(int(fp["size"]), set()).add(fp["sha256_first_mib"])
    found = []
    for slide in slides:
        if slide.slide_id in ids:
            found.append(slide)
            continue
        try:
            size = slide.path.stat().st_size
            if size in by_size and file_fingerprint(slide.path)["sha256_first_mib"] in by_size[size]:
                found.append(slide)
        except (OSError, SlideError):
            continue  # an unreadable file fails later, in the run, with its own message
    return found
