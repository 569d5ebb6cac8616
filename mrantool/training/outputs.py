"""Read what a fit run wrote about each slide: its out-of-fold prediction (predictions.csv, repeat 0)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from mrantool.errors import MrantoolError


@dataclass(frozen=True)
class SlidePrediction:
    """A slide's held-out prediction: true label, predicted class, the probability of each class."""

    slide_id: str
    label: str
    predicted: str
    probs: dict[str, float]

    @property
    def confidence(self) -> float:
        """Probability of the predicted class."""
        return self.probs.get(self.predicted, float("nan"))


def read_predictions(run_dir: str | Path) -> dict[str, SlidePrediction]:
    """slide_id -> its repeat-0 out-of-fold prediction from the run's predictions.csv ({} when the run has none)."""
    path = Path(run_dir) / "predictions.csv"
    if not path.is_file():
        return {}
    try:
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise MrantoolError(f"Cannot read {path} ({exc}); re-run `mrantool fit`.") from None
    out: dict[str, SlidePrediction] = {}
    for row in rows:
        if row.get("repeat", "0") not in ("0", "") or not row.get("slide_id") or row["slide_id"] in out:
            continue
        try:
            probs = {key[5:]: float(value) for key, value in row.items() if key.startswith("prob_") and value}
        except ValueError:
            raise MrantoolError(f"{path} has a non-numeric probability for slide '{row['slide_id']}'; re-run "
                                "`mrantool fit`.") from None
        out[row["slide_id"]] = SlidePrediction(row["slide_id"], row.get("label") or "", row.get("predicted") or "",
                                               probs)
    return out
