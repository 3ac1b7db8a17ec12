"""Agreement of the rule-based labeler with hand-written radiology sentences, and its speed.

  python benchmarks/labeler_agreement.py [--table PATH ...] [--synthetic 0] [--prompts 0]
                                         [--seconds 2] [--show-errors]

Each table holds realistic report sentences and short reports with their expected label
per finding (1 positive, 0 negative, -1 uncertain, blank); by default both
`tests/data/labeler_sentences.txt` (the development table, whose error classes the rules
were written for) and `tests/data/labeler_heldout.txt` (written afterwards, in fresh
phrasings: the figure that says how the labeler generalises). Their headers say how they
were written. Printed per table:

- per finding: the positive-class precision / recall / F1 (labeler 1 = positive, the way
  a labeler is checked against radiologists' tags) and the 4-class macro F1 (positive,
  negative, uncertain, blank: the mean one-vs-rest F1 over the classes that occur);
- per error class of the table: rows, rows whose 14 labels all agree;
- `positive_macro_f1` and `macro_f1` (means over the findings the table mentions), and the
  labeler's speed in reports per CPU second on one core (reports of 6 table rows each,
  as real reports run 4-10 sentences).

`--synthetic N` also prints the 4-class agreement on N synthetic reports, whose true
labels the generator knows; `--prompts N` the exact-match rate of N `labels_to_prompt`
texts labelled back.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from input_pipeline import labeler  # noqa: E402
from input_pipeline.findings import CHEXPERT_FINDINGS, FINDING_INDEX, NUM_FINDINGS  # noqa: E402

DEFAULT_TABLE = os.path.join(REPO, "tests", "data", "labeler_sentences.txt")
HELDOUT_TABLE = os.path.join(REPO, "tests", "data", "labeler_heldout.txt")
CODES = {
    "NF": "No Finding", "EC": "Enlarged Cardiomediastinum", "CM": "Cardiomegaly",
    "OP": "Lung Opacity", "LL": "Lung Lesion", "ED": "Edema", "CO": "Consolidation",
    "PNA": "Pneumonia", "AT": "Atelectasis", "PTX": "Pneumothorax", "EFF": "Pleural Effusion",
    "PO": "Pleural Other", "FX": "Fracture", "SD": "Support Devices",
}
VALUES = {"1": 1.0, "0": 0.0, "u": -1.0}
CLASSES = (1.0, 0.0, -1.0, None)  # positive, negative, uncertain, blank


@dataclasses.dataclass(frozen=True)
class Row:
    kind: str  # The error class or topic of the row.
    text: str
    labels: np.ndarray  # float32 [14], NaN = blank
    line: int


def parse_labels(field: str, where: str = "") -> np.ndarray:
    """float32 [14] from "CM=1 EFF=0 PNA=u"; "No Finding" by the CheXpert rule unless given."""
    labels = np.full(NUM_FINDINGS, np.nan, np.float32)
    for item in field.split():
        code, _, value = item.partition("=")
        if code not in CODES or value not in VALUES:
            raise ValueError(f"{where}: bad label {item!r} (codes {sorted(CODES)}, "
                             f"values {sorted(VALUES)})")
        labels[FINDING_INDEX[CODES[code]]] = VALUES[value]
    if "NF=" not in field:
        pathologies = [FINDING_INDEX[n] for n in CHEXPERT_FINDINGS
                       if n not in labeler.NOT_PATHOLOGIES]
        if not np.any(np.isin(labels[pathologies], (1.0, -1.0))):
            labels[FINDING_INDEX["No Finding"]] = 1.0
    return labels


def load_table(path: str = DEFAULT_TABLE) -> list[Row]:
    """The rows of a table file (format in its header)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip() or line.startswith("#"):
                continue
            parts = [p.strip() for p in line.split("|")]
            if len(parts) != 3:
                raise ValueError(f"{path}:{number}: want 'class | text | labels', got {line!r}")
            kind, text, field = parts
            text = text.replace("\\n", "\n")
            rows.append(Row(kind, text, parse_labels(field, f"{path}:{number}"), number))
    return rows


def _classes(labels: np.ndarray) -> np.ndarray:
    out = np.full(labels.shape, len(CLASSES) - 1, np.int64)
    for index, value in enumerate(CLASSES[:-1]):
        out[labels == value] = index
    return out


def _prf(truth: np.ndarray, pred: np.ndarray) -> tuple[float, float, float]:
    tp, fp, fn = np.sum(truth & pred), np.sum(~truth & pred), np.sum(truth & ~pred)
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    return float(precision), float(recall), float(f1)


def agreement(truth: np.ndarray, predicted: np.ndarray) -> list[dict]:
    """Per finding: counts per class, positive P/R/F1 and the 4-class macro F1."""
    t_cls, p_cls = _classes(truth), _classes(predicted)
    rows = []
    for k, name in enumerate(CHEXPERT_FINDINGS):
        t, p = t_cls[:, k], p_cls[:, k]
        per_class = [_prf(t == c, p == c)[2] for c in range(len(CLASSES))]
        occurring = [f for f in per_class if not np.isnan(f)]
        rows.append({
            "finding": name,
            "counts": [int(np.sum(t == c)) for c in range(len(CLASSES))],
            "positive": _prf(t == 0, p == 0),
            "macro_f1": float(np.mean(occurring)),
            "mentioned": bool(np.any(t != len(CLASSES) - 1)),
        })
    return rows


def _same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a == b) | (np.isnan(a) & np.isnan(b))


def reports_per_second(texts: list[str], seconds: float) -> float:
    """Labelled reports per second of this process's CPU time (one core: the labeler is
    single-threaded Python, and CPU time does not count what other processes take)."""
    count, start = 0, time.process_time()
    while time.process_time() - start < seconds:
        for text in texts:
            labeler.label_report(text)
        count += len(texts)
    return count / (time.process_time() - start)


def _print_synthetic(count: int, seed: int) -> None:
    from input_pipeline import synthetic_cxr

    studies = [synthetic_cxr.generate_study(seed, "train", i, source_image_size=16)
               for i in range(count)]
    truth = np.stack([s.labels for s in studies])
    rows = agreement(truth, labeler.label_reports([s.report for s in studies]))
    mentioned = [r["macro_f1"] for r in rows if r["mentioned"]]
    cells = _same(truth, labeler.label_reports([s.report for s in studies]))
    print(f"synthetic reports: {count}, cell agreement {cells.mean():.4f}, "
          f"4-class macro F1 {np.mean(mentioned):.4f}")


def _print_prompts(count: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    exact = 0
    for _ in range(count):
        labels = np.full(NUM_FINDINGS, np.nan, np.float32)
        labels[1:] = rng.choice([np.nan, 1.0, 0.0, -1.0], size=NUM_FINDINGS - 1,
                                p=[0.55, 0.15, 0.2, 0.1])
        if not np.any(np.isin(labels[1:-1], (1.0, -1.0))):
            labels[0] = 1.0
        got = labeler.label_report(labeler.labels_to_prompt(labels, rng))
        exact += bool(_same(got, labels).all())
    print(f"labels_to_prompt round trip: {exact / count:.4f} exact label vectors of {count}")


def table_report(path: str, show_errors: bool = False) -> dict:
    """Prints one table's agreement; returns its headline figures."""
    table = load_table(path)
    truth = np.stack([r.labels for r in table])
    predicted = labeler.label_reports([r.text for r in table])
    rows = agreement(truth, predicted)
    right = _same(truth, predicted).all(axis=1)

    print(f"\n{len(table)} rows of {os.path.relpath(path, REPO)}")
    print(f"{'finding':28s} {'n_pos':>5s} {'n_neg':>5s} {'n_unc':>5s} {'prec':>6s} {'rec':>6s} "
          f"{'F1pos':>6s} {'F1mac':>6s}")
    fmt = lambda x: "   n/a" if np.isnan(x) else f"{x:6.3f}"
    for row in rows:
        c, (p, r, f) = row["counts"], row["positive"]
        print(f"{row['finding']:28s} {c[0]:5d} {c[1]:5d} {c[2]:5d} {fmt(p)} {fmt(r)} {fmt(f)} "
              f"{fmt(row['macro_f1'])}")
    print(f"{'class':16s} {'rows':>5s} {'all 14 right':>12s}")
    for kind in dict.fromkeys(r.kind for r in table):
        mask = np.array([r.kind == kind for r in table])
        print(f"{kind:16s} {mask.sum():5d} {right[mask].mean():12.3f}")
    if show_errors:
        for row, ok, got in zip(table, right, predicted, strict=True):
            if not ok:
                diff = [f"{CHEXPERT_FINDINGS[k]}: want {row.labels[k]} got {got[k]}"
                        for k in range(NUM_FINDINGS) if not _same(row.labels[k], got[k])]
                print(f"  line {row.line}: {row.text!r}: {'; '.join(diff)}")
    mentioned = [r for r in rows if r["mentioned"]]
    result = {
        "rows": len(table), "rows_right": float(right.mean()),
        "positive_macro_f1": float(np.mean([r["positive"][2] for r in mentioned
                                            if r["counts"][0]])),
        "macro_f1": float(np.mean([r["macro_f1"] for r in mentioned])),
        "texts": [r.text for r in table],
    }
    print(f"rows_right={result['rows_right']:.4f} positive_macro_f1="
          f"{result['positive_macro_f1']:.4f} macro_f1={result['macro_f1']:.4f}")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--table", nargs="+", default=[DEFAULT_TABLE, HELDOUT_TABLE])
    parser.add_argument("--synthetic", type=int, default=0, help="synthetic reports to label")
    parser.add_argument("--prompts", type=int, default=0, help="labels_to_prompt round trips")
    parser.add_argument("--seconds", type=float, default=2.0, help="speed measurement time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show-errors", action="store_true", help="print every wrong row")
    args = parser.parse_args(argv)

    results = {os.path.basename(path): table_report(path, args.show_errors)
               for path in args.table}
    print()
    if args.synthetic:
        _print_synthetic(args.synthetic, args.seed)
    if args.prompts:
        _print_prompts(args.prompts, args.seed)
    texts = [t for result in results.values() for t in result.pop("texts")]
    rng = np.random.default_rng(args.seed)
    reports = [" ".join(texts[i] for i in rng.choice(len(texts), 6, replace=False))
               for _ in range(200)]
    speed = reports_per_second(reports, args.seconds)
    print(f"speed: {speed:.0f} reports/s on one core (reports of 6 table rows)")
    results["reports_per_s"] = speed
    return results


if __name__ == "__main__":
    main()
