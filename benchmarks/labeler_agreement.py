"""Agreement of the rule-based labeler with the synthetic generator's true labels.

  python benchmarks/labeler_agreement.py [--studies 2000] [--seed 0] [--split train]
                                         [--prompts 0]

The synthetic generator (`input_pipeline.synthetic_cxr.generate_study`, no TensorFlow)
writes each report from the findings it drew and knows its CheXpert labels. The labeler
reads the report text only. Every (study, finding) cell is one of four classes:
positive (1), negative (0), uncertain (-1), blank (NaN, not mentioned).

Per finding the table shows the true class counts, the accuracy (cells whose class
agrees), the one-vs-rest F1 of each class, and the finding's macro F1 = the mean F1 over
the classes that occur in the truth or the prediction of that finding. Findings the
generator never mentions (always blank in the truth) are shown but left out of the mean.
The last line is `mean_f1=<x>`: the mean macro F1 over the mentioned findings.

`--prompts N` also labels N texts of `labels_to_prompt` (random label vectors with a
consistent "No Finding") and prints their exact-match rate first.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from input_pipeline import labeler, synthetic_cxr  # noqa: E402
from input_pipeline.findings import CHEXPERT_FINDINGS, NUM_FINDINGS  # noqa: E402

CLASSES = (("pos", 1.0), ("neg", 0.0), ("unc", -1.0), ("blank", None))


def _classes(labels: np.ndarray) -> np.ndarray:
    """int [N, 14]: index into CLASSES."""
    out = np.full(labels.shape, 3, dtype=np.int64)
    for index, (_, value) in enumerate(CLASSES[:3]):
        out[labels == value] = index
    return out


def _f1(truth: np.ndarray, pred: np.ndarray, cls: int) -> float:
    tp = np.sum((truth == cls) & (pred == cls))
    fp = np.sum((truth != cls) & (pred == cls))
    fn = np.sum((truth == cls) & (pred != cls))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")


def agreement_table(truth_labels: np.ndarray, predicted: np.ndarray):
    """(rows of per-finding figures, mean macro F1 over the mentioned findings)."""
    truth, pred = _classes(truth_labels), _classes(predicted)
    rows, macro = [], []
    for k, name in enumerate(CHEXPERT_FINDINGS):
        t, p = truth[:, k], pred[:, k]
        f1s = [_f1(t, p, c) for c in range(len(CLASSES))]
        present = [f for f in f1s if not np.isnan(f)]
        finding_f1 = float(np.mean(present))
        mentioned = bool(np.any(t != 3))
        if mentioned:
            macro.append(finding_f1)
        rows.append({
            "finding": name, "counts": [int(np.sum(t == c)) for c in range(len(CLASSES))],
            "accuracy": float(np.mean(t == p)), "f1": f1s, "macro_f1": finding_f1,
            "mentioned": mentioned,
        })
    return rows, float(np.mean(macro))


def _prompt_round_trip(count: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    exact = 0
    for _ in range(count):
        labels = np.full(NUM_FINDINGS, np.nan, np.float32)
        labels[1:] = rng.choice([np.nan, 1.0, 0.0, -1.0], size=NUM_FINDINGS - 1,
                                p=[0.55, 0.15, 0.2, 0.1])
        if not np.any(np.isin(labels[1:-1], (1.0, -1.0))):
            labels[0] = 1.0
        got = labeler.label_report(labeler.labels_to_prompt(labels, rng))
        exact += bool(np.array_equal(np.nan_to_num(got, nan=9), np.nan_to_num(labels, nan=9)))
    return exact / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="train", choices=sorted(synthetic_cxr.SPLIT_CODES))
    parser.add_argument("--prompts", type=int, default=0)
    args = parser.parse_args()

    if args.prompts:
        rate = _prompt_round_trip(args.prompts, args.seed)
        print(f"labels_to_prompt round trip: {rate:.4f} exact label vectors of {args.prompts}")

    studies = [synthetic_cxr.generate_study(args.seed, args.split, i, source_image_size=16)
               for i in range(args.studies)]
    truth = np.stack([s.labels for s in studies])
    start = time.perf_counter()
    predicted = labeler.label_reports([s.report for s in studies])
    seconds = time.perf_counter() - start
    rows, mean_f1 = agreement_table(truth, predicted)

    print(f"{args.studies} synthetic studies (seed {args.seed}, {args.split}); labeler "
          f"{1e3 * seconds / args.studies:.2f} ms/report")
    header = (f"{'finding':28s} {'n_pos':>6s} {'n_neg':>6s} {'n_unc':>6s} {'n_blank':>7s} "
              f"{'acc':>6s} {'F1pos':>6s} {'F1neg':>6s} {'F1unc':>6s} {'F1blank':>7s} "
              f"{'macroF1':>7s}")
    print(header)
    fmt = lambda x: "   n/a" if np.isnan(x) else f"{x:6.3f}"
    for row in rows:
        counts = row["counts"]
        f1 = row["f1"]
        note = "" if row["mentioned"] else "  (never mentioned: not in the mean)"
        print(f"{row['finding']:28s} {counts[0]:6d} {counts[1]:6d} {counts[2]:6d} "
              f"{counts[3]:7d} {row['accuracy']:6.3f} {fmt(f1[0])} {fmt(f1[1])} {fmt(f1[2])} "
              f"{fmt(f1[3]):>7s} {row['macro_f1']:7.3f}{note}")
    cells = (truth == predicted) | (np.isnan(truth) & np.isnan(predicted))
    print(f"cell agreement={cells.mean():.4f} exact_reports={cells.all(axis=1).mean():.4f}")
    print(f"mean_f1={mean_f1:.4f}")


if __name__ == "__main__":
    main()
