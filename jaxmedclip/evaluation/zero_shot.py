"""Zero-shot classification from embeddings: binary prompt pairs and multi-class prompts.

Binary (the CheXzero protocol): each finding has a positive and a negative prompt set; a
set's embedding is the mean of its prompts' embeddings, L2-normalised; the probability of
the finding is the softmax over the pair of image-text similarities (times `scale`).

Multi-class (CheXpert 5x200 style): images positive for exactly one of K classes, up to
`per_class` of each; the class whose prompt-set embedding is most similar wins.

Embeddings are numpy arrays, assumed L2-normalised (as `TwoTower` returns them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import special
from sklearn import metrics as skm

from jaxmedclip.evaluation.metrics import POSITIVE, UNCERTAIN


def ensemble_embedding(prompt_embeddings: np.ndarray) -> np.ndarray:
    """[P, D] prompt embeddings -> [D]: their mean, L2-normalised."""
    mean = np.mean(np.asarray(prompt_embeddings, np.float64), axis=0)
    norm = np.linalg.norm(mean)
    if norm == 0:
        raise ValueError("the prompt embeddings average to zero; cannot normalise")
    return (mean / norm).astype(np.float32)


def binary_probabilities(
    image_emb: np.ndarray,
    positive_emb: np.ndarray,
    negative_emb: np.ndarray,
    scale: float = 1.0,
) -> np.ndarray:
    """P(finding) [N, C]: softmax over (positive, negative) similarities of each finding.

    `image_emb` [N, D]; `positive_emb`, `negative_emb` [C, D], one ensemble per finding.
    """
    image_emb = np.asarray(image_emb, np.float64)
    positive = image_emb @ np.asarray(positive_emb, np.float64).T
    negative = image_emb @ np.asarray(negative_emb, np.float64).T
    logits = scale * np.stack([positive, negative], axis=-1)
    return special.softmax(logits, axis=-1)[..., 0]


def select_multiclass(
    labels: np.ndarray, per_class: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(row indices, class targets) of rows positive for exactly one of the K columns.

    `labels` [N, K] in CheXpert convention; rows with an uncertain class are left out.
    Up to `per_class` rows per class are drawn without replacement (seeded); indices are
    returned in ascending order.
    """
    labels = np.asarray(labels, np.float32)
    positive = labels == POSITIVE
    eligible = (positive.sum(axis=1) == 1) & ~np.any(labels == UNCERTAIN, axis=1)
    targets = np.argmax(positive, axis=1)
    rng = np.random.default_rng(seed)
    chosen = []
    for k in range(labels.shape[1]):
        rows = np.flatnonzero(eligible & (targets == k))
        if per_class and rows.size > per_class:
            rows = rng.choice(rows, per_class, replace=False)
        chosen.append(rows)
    indices = np.sort(np.concatenate(chosen)).astype(np.int64)
    return indices, targets[indices]


def multiclass_report(
    image_emb: np.ndarray,
    class_emb: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    *,
    per_class: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """Accuracy and confusion matrix (rows: true, columns: predicted) of prompt matching.

    `class_emb` [K, D] (one prompt-set ensemble per class); `labels` [N, K].
    """
    indices, targets = select_multiclass(labels, per_class, seed)
    counts = np.bincount(targets, minlength=len(class_names))
    out: dict[str, Any] = {
        "classes": list(class_names),
        "n": int(indices.size),
        "n_per_class": {name: int(n) for name, n in zip(class_names, counts, strict=True)},
        "chance": 1.0 / len(class_names),
    }
    if indices.size == 0:
        out.update(accuracy=None, confusion_matrix=None, reason="no image with exactly one class")
        return out
    similarity = np.asarray(image_emb, np.float64)[indices] @ np.asarray(class_emb, np.float64).T
    predicted = np.argmax(similarity, axis=1)
    out["accuracy"] = float(skm.accuracy_score(targets, predicted))
    out["confusion_matrix"] = skm.confusion_matrix(
        targets, predicted, labels=np.arange(len(class_names))
    ).tolist()
    return out
