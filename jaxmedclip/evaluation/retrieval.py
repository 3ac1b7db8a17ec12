"""Image->report and report->image retrieval: Recall@K and median rank, with chance levels.

Row i of the image and of the text embeddings is one pair. A retrieved item is a hit when
its report text is identical to the query's (after normalisation): normal reports repeat,
and retrieving another "no acute cardiopulmonary process" for a normal image is right.
`text_keys` carries that identity (normalised text, or any id of it).

A query's rank is 1 + the number of non-hit candidates scoring at least as high as its best
hit (ties count against the model, so a constant embedding does not look perfect).
Chance: under a uniformly random ranking, P(a hit in the top K) for a query with h hits
among N candidates is 1 - hypergeom(N, h, K).pmf(0), averaged over queries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

DEFAULT_KS = (1, 5, 10)


def text_groups(text_keys: Sequence) -> np.ndarray:
    """int64 [N]: equal for rows whose keys (texts or text ids) are equal."""
    keys = np.asarray(text_keys)
    if keys.dtype.kind == "O":
        keys = keys.astype(bytes)
    _, groups = np.unique(keys, return_inverse=True)
    return groups.reshape(-1).astype(np.int64)


def hit_ranks(
    query_emb: np.ndarray,
    candidate_emb: np.ndarray,
    groups: np.ndarray,
    chunk_size: int = 1024,
) -> np.ndarray:
    """int64 [N]: the rank of each query's best hit (candidate j is a hit of query i when
    groups[i] == groups[j]; query i and candidate i are a pair)."""
    query_emb = np.asarray(query_emb, np.float32)
    candidate_emb = np.asarray(candidate_emb, np.float32)
    groups = np.asarray(groups)
    n = query_emb.shape[0]
    if candidate_emb.shape[0] != n or groups.shape != (n,):
        raise ValueError(
            f"need as many candidates and groups as queries; got {query_emb.shape[0]} queries, "
            f"{candidate_emb.shape[0]} candidates, groups of shape {groups.shape}"
        )
    ranks = np.empty(n, np.int64)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        similarity = query_emb[start:stop] @ candidate_emb.T
        hits = groups[start:stop, None] == groups[None, :]
        best_hit = np.max(np.where(hits, similarity, -np.inf), axis=1, keepdims=True)
        ranks[start:stop] = 1 + np.sum(~hits & (similarity >= best_hit), axis=1)
    return ranks


def chance_recall(groups: np.ndarray, k: int) -> float:
    """Expected Recall@k of a uniformly random ranking (see the module docstring)."""
    groups = np.asarray(groups)
    n = groups.size
    hits_per_query = np.bincount(groups)[groups]
    miss = stats.hypergeom(n, hits_per_query, min(k, n)).pmf(0)
    return float(np.mean(1.0 - miss))


def direction_report(ranks: np.ndarray, groups: np.ndarray, ks: Sequence[int]) -> dict[str, Any]:
    out: dict[str, Any] = {f"recall@{k}": float(np.mean(ranks <= k)) for k in ks}
    out["median_rank"] = float(np.median(ranks))
    out["chance"] = {f"recall@{k}": chance_recall(groups, k) for k in ks}
    return out


def retrieval_report(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    text_keys: Sequence,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, Any]:
    """Both directions over N image-report pairs; `text_keys` say which reports are equal."""
    groups = text_groups(text_keys)
    return {
        "num_queries": int(groups.size),
        "num_distinct_texts": int(np.unique(groups).size),
        "image_to_text": direction_report(hit_ranks(image_emb, text_emb, groups), groups, ks),
        "text_to_image": direction_report(hit_ranks(text_emb, image_emb, groups), groups, ks),
    }
