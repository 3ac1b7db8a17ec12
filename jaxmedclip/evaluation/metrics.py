"""Binary classification metrics: AUC with bootstrap CIs, F1 and MCC at a chosen threshold.

Every number comes from scikit-learn or SciPy. The AUC confidence interval is a stratified
percentile bootstrap (`scipy.stats.bootstrap` over the positive and the negative scores as
two independent samples), so that no resample lacks a class. Within the bootstrap the AUC
is computed as the Mann-Whitney U statistic over n_pos * n_neg, which is the same number
as `sklearn.metrics.roc_auc_score` (ties count one half) and vectorises over resamples.

Label convention (CheXpert): 1 positive, 0 negative, blank negative (the pipeline writes
blanks as 0), -1 uncertain: uncertain examples are left out of that finding's metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats
from sklearn import metrics as skm

POSITIVE, UNCERTAIN = 1.0, -1.0


def binary_targets(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(targets, valid) from CheXpert labels: targets = label is 1; valid = label is not -1."""
    labels = np.asarray(labels, np.float32)
    return labels == POSITIVE, labels != UNCERTAIN


def _class_counts(y_true: np.ndarray) -> tuple[int, int]:
    n_pos = int(np.sum(y_true))
    return n_pos, int(y_true.size - n_pos)


def _mann_whitney_auc(positive: np.ndarray, negative: np.ndarray, axis: int = -1) -> np.ndarray:
    u = stats.mannwhitneyu(positive, negative, axis=axis, method="asymptotic").statistic
    return u / (positive.shape[axis] * negative.shape[axis])


def bootstrap_auc_ci(
    y_true: np.ndarray,
    y_score: np.ndarray,
    *,
    num_samples: int = 1000,
    confidence: float = 0.95,
    seed: int | Sequence[int] = 0,
) -> tuple[float, float] | None:
    """Stratified percentile-bootstrap CI of the AUC; None below 2 positives or 2 negatives.

    Deterministic for a given `seed` (an int or a sequence of ints, e.g. (seed, class)).
    """
    y_true = np.asarray(y_true).astype(bool)
    y_score = np.asarray(y_score, np.float64)
    positive, negative = y_score[y_true], y_score[~y_true]
    if num_samples <= 0 or positive.size < 2 or negative.size < 2:
        return None
    result = stats.bootstrap(
        (positive, negative),
        _mann_whitney_auc,
        n_resamples=num_samples,
        batch=max(1, int(2e7 // y_score.size)),  # Bounds the memory of one vectorised batch.
        vectorized=True,
        paired=False,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def max_f1_threshold(y_true: np.ndarray, y_score: np.ndarray) -> float | None:
    """The score threshold (predict positive at score >= threshold) of highest F1.

    Meant for a validation split; None when it has no positive or no negative example.
    """
    y_true = np.asarray(y_true).astype(bool)
    n_pos, n_neg = _class_counts(y_true)
    if n_pos == 0 or n_neg == 0:
        return None
    precision, recall, thresholds = skm.precision_recall_curve(y_true, y_score)
    precision, recall = precision[:-1], recall[:-1]  # The last point has no threshold.
    denominator = precision + recall
    f1 = np.divide(
        2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0
    )
    return float(thresholds[int(np.argmax(f1))])


def thresholded_metrics(y_true: np.ndarray, y_score: np.ndarray, threshold: float) -> dict:
    """F1 and Matthews correlation of `score >= threshold` (scikit-learn)."""
    y_true = np.asarray(y_true).astype(bool)
    y_pred = np.asarray(y_score) >= threshold
    return {
        "f1": float(skm.f1_score(y_true, y_pred, zero_division=0.0)),
        "mcc": float(skm.matthews_corrcoef(y_true, y_pred)),
    }


def binary_report(
    y_true: np.ndarray,
    y_score: np.ndarray,
    *,
    threshold_true: np.ndarray | None = None,
    threshold_score: np.ndarray | None = None,
    num_samples: int = 1000,
    confidence: float = 0.95,
    seed: int | Sequence[int] = 0,
) -> dict[str, Any]:
    """AUC (+ bootstrap CI), and F1/MCC at the max-F1 threshold of the threshold split.

    Returns `auc`: None with a `reason` when the AUC is undefined (a single class).
    """
    y_true = np.asarray(y_true).astype(bool)
    y_score = np.asarray(y_score, np.float64)
    n_pos, n_neg = _class_counts(y_true)
    out: dict[str, Any] = {"n_positive": n_pos, "n_negative": n_neg}
    if n_pos == 0 or n_neg == 0:
        out.update(auc=None, ci=None, reason=f"{n_pos} positive and {n_neg} negative examples")
    else:
        out["auc"] = float(skm.roc_auc_score(y_true, y_score))
        ci = bootstrap_auc_ci(
            y_true, y_score, num_samples=num_samples, confidence=confidence, seed=seed
        )
        out["ci"] = None if ci is None else list(ci)
    out.update(threshold=None, f1=None, mcc=None)
    if threshold_true is not None and threshold_score is not None:
        threshold = max_f1_threshold(threshold_true, threshold_score)
        if threshold is not None and y_true.size:
            out.update(threshold=threshold, **thresholded_metrics(y_true, y_score, threshold))
    return out


def multilabel_report(
    labels: np.ndarray,
    scores: np.ndarray,
    class_names: Sequence[str],
    *,
    threshold_labels: np.ndarray | None = None,
    threshold_scores: np.ndarray | None = None,
    num_samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Per-class `binary_report`s over CheXpert-convention `labels` [N, C], plus means.

    Uncertain (-1) examples of a class are left out of that class only. `mean_auc`,
    `mean_f1` and `mean_mcc` average the classes where the metric is defined (None if none).
    """
    targets, valid = binary_targets(labels)
    scores = np.asarray(scores)
    if threshold_labels is not None:
        threshold_targets, threshold_valid = binary_targets(threshold_labels)
    per_class = {}
    for c, name in enumerate(class_names):
        keep = valid[:, c]
        kwargs = {}
        if threshold_labels is not None and threshold_scores is not None:
            tkeep = threshold_valid[:, c]
            kwargs = dict(
                threshold_true=threshold_targets[tkeep, c],
                threshold_score=np.asarray(threshold_scores)[tkeep, c],
            )
        report = binary_report(
            targets[keep, c],
            scores[keep, c],
            num_samples=num_samples,
            confidence=confidence,
            seed=(seed, c),
            **kwargs,
        )
        report["n_excluded"] = int(np.sum(~keep))
        per_class[name] = report

    def mean(key):
        values = [r[key] for r in per_class.values() if r[key] is not None]
        return float(np.mean(values)) if values else None

    return {
        "per_class": per_class,
        "mean_auc": mean("auc"),
        "mean_f1": mean("f1"),
        "mean_mcc": mean("mcc"),
    }
