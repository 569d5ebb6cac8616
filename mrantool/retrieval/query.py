"""Search results as plain rows (query, rank, slide, bag, patch, cell, similarity) for the CLI to render.

No slide or store reading here: callers pass query vectors (and the slides they came from, for
`exclude_same_slide`) and get back dictionaries of Python scalars, best hit first per query.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mrantool.errors import MrantoolError
from mrantool.retrieval.index import EmbeddingIndex

COLUMNS = ("query", "rank", "slide", "bag", "patch", "cell", "similarity")


def result_rows(index: EmbeddingIndex, similarities: np.ndarray, rows: np.ndarray) -> list[dict[str, Any]]:
    """One dict per hit of `index.search` output (`COLUMNS`; `cell` is None for patch-level indexes).

    Padding (row -1, when fewer than k hits exist) is dropped; `rank` counts from 1 within each query.
    """
    sims = np.atleast_2d(similarities)
    found = np.atleast_2d(rows)
    query, position = np.nonzero(found >= 0)
    hits = index.lookup(found[query, position])
    cells = hits.get("cell")
    return [
        {
            "query": int(query[i]),
            "rank": int(position[i]) + 1,
            "slide": str(hits["slide_name"][i]),
            "bag": int(hits["bag"][i]),
            "patch": int(hits["patch"][i]),
            "cell": None if cells is None else int(cells[i]),
            "similarity": float(sims[query[i], position[i]]),
        }
        for i in range(len(query))
    ]


def search_rows(
    index: EmbeddingIndex,
    queries: np.ndarray,
    k: int,
    *,
    query_slides: Sequence[str] | None = None,
    exclude_same_slide: bool = False,
) -> list[dict[str, Any]]:
    """Search and return `result_rows`; with `exclude_same_slide`, hits from each query's own slide are skipped.

    `query_slides` names the slide each query vector came from (needed for `exclude_same_slide`); a slide
    the index does not hold excludes nothing.
    """
    q = np.atleast_2d(queries)
    exclude = None
    if exclude_same_slide:
        if query_slides is None or len(query_slides) != len(q):
            raise MrantoolError(
                "exclude_same_slide needs the slide of every query vector; pass query_slides with one name per query."
            )
        exclude = index.slide_codes(query_slides)
    sims, rows = index.search(q, k, exclude_slides=exclude)
    return result_rows(index, sims, rows)
