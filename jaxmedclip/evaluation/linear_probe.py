"""Linear probes: frozen image embeddings -> one logistic regression per finding.

For each fraction of the labelled training split (a seeded subset, the same rows for every
finding), a standardised logistic regression (scikit-learn) is fit per finding on the rows
whose label is not uncertain, and scored by AUC on the test split. A finding whose subset
holds a single class (common at 1% of a small split) is reported as None with a reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from sklearn import metrics as skm
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from jaxmedclip.evaluation.metrics import binary_targets

DEFAULT_FRACTIONS = (0.01, 0.1, 1.0)


class ProbeResult(NamedTuple):
    report: dict[str, Any]
    # fraction label ("1%") -> P(finding) on the test rows [N, C], NaN where not fit.
    test_scores: dict[str, np.ndarray]


def fraction_label(fraction: float) -> str:
    return f"{100 * fraction:g}%"


def subset_rows(num_rows: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded `fraction` of `num_rows` (at least one row)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"linear-probe fractions must be in (0, 1]; got {fraction}")
    size = max(1, round(fraction * num_rows))
    # One stream per (seed, fraction): changing the list of fractions moves no subset.
    rng = np.random.default_rng([seed, round(fraction * 1_000_000)])
    return np.sort(rng.choice(num_rows, size, replace=False))


def linear_probe(
    train_emb: np.ndarray,
    train_labels: np.ndarray,
    test_emb: np.ndarray,
    test_labels: np.ndarray,
    class_names: Sequence[str],
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    regularization: float = 1.0,
    max_iter: int = 1000,
) -> ProbeResult:
    """Test AUC per finding (and mean) of probes fit on each fraction of the training rows.

    Labels are [N, C] in CheXpert convention (columns = `class_names`); `regularization`
    is scikit-learn's C (inverse strength).
    """
    train_targets, train_valid = binary_targets(train_labels)
    test_targets, test_valid = binary_targets(test_labels)
    train_emb = np.asarray(train_emb, np.float32)
    test_emb = np.asarray(test_emb, np.float32)
    report: dict[str, Any] = {"n_train_total": int(train_emb.shape[0]), "fractions": {}}
    all_scores = {}
    for fraction in fractions:
        rows = subset_rows(train_emb.shape[0], fraction, seed)
        aucs: dict[str, float | None] = {}
        skipped: dict[str, str] = {}
        scores = np.full((test_emb.shape[0], len(class_names)), np.nan, np.float32)
        for c, name in enumerate(class_names):
            fit_rows = rows[train_valid[rows, c]]
            y = train_targets[fit_rows, c]
            n_pos = int(y.sum())
            if n_pos == 0 or n_pos == y.size:
                aucs[name] = None
                skipped[name] = f"training subset has {n_pos} positives of {y.size}"
                continue
            probe = make_pipeline(
                StandardScaler(),
                LogisticRegression(C=regularization, max_iter=max_iter, random_state=seed),
            )
            probe.fit(train_emb[fit_rows], y)
            scores[:, c] = probe.predict_proba(test_emb)[:, 1]
            keep = test_valid[:, c]
            y_test = test_targets[keep, c]
            if y_test.all() or not y_test.any():
                aucs[name] = None
                skipped[name] = "test split has a single class"
                continue
            aucs[name] = float(skm.roc_auc_score(y_test, scores[keep, c]))
        defined = [v for v in aucs.values() if v is not None]
        label = fraction_label(fraction)
        report["fractions"][label] = {
            "fraction": float(fraction),
            "n_train": int(rows.size),
            "mean_auc": float(np.mean(defined)) if defined else None,
            "auc": aucs,
            "skipped": skipped,
        }
        all_scores[label] = scores
    return ProbeResult(report, all_scores)
