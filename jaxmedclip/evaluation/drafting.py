"""Report drafting by sentence retrieval (CXR-RePaiR style) and its label-agreement metrics.

An image's draft is made of training-report sentences: every sentence of the index
(`SentenceIndex`: the training split's report sentences, deduplicated, embedded once by
the text tower) is scored by its cosine similarity with the image embedding, and the
best are taken in order, skipping a candidate that

- is too similar to a sentence already taken (embedding cosine >= `max_similarity`),
- states a finding a sentence already taken states (`distinct_findings`; per the
  labeler: "No pleural effusion." after "There is no pleural effusion or
  pneumothorax."), or
- contradicts one already taken on a finding (always): one says the finding is present
  or possible, the other that it is absent, or one is a statement of normality ("No acute
  cardiopulmonary process.": the labeler's No Finding and nothing else) and the other
  states an abnormality (a finding other than Support Devices present or possible),

until `k` sentences are taken (fewer when the `candidates` best run out). The draft is
those sentences joined in the order they were taken.

Metrics (`label_agreement`), the way CheXbert-F1 scores generated reports: the labeler
(`input_pipeline.labeler.label_report`) labels the draft and the reference report; a
finding is predicted / true when its label is 1 (negative, uncertain and blank are not).
Per finding: precision, recall, F1; macro means over the findings with at least one
reference positive (a finding no draft states counts with precision 0, scikit-learn's
`zero_division=0`), micro from the pooled counts. Baselines (`baseline_labels`): the most
common training report for every image, and a random training report per image (seeded).

Pure numpy here; the labeler (`input_pipeline`, pure Python) is imported when first used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxmedclip.vocabulary import FINDING_INDEX, NUM_FINDINGS

POSITIVE, NEGATIVE = 1.0, 0.0
_NO_FINDING = FINDING_INDEX["No Finding"]
# Findings whose presence does not make a study abnormal (the labeler's NOT_PATHOLOGIES).
_NOT_ABNORMAL = (FINDING_INDEX["No Finding"], FINDING_INDEX["Support Devices"])
_ABNORMAL = np.array([i not in _NOT_ABNORMAL for i in range(NUM_FINDINGS)])


@dataclasses.dataclass(frozen=True)
class SentenceIndex:
    """The training split's report sentences and reports, as drafting reads them."""

    sentences: list[str]  # Distinct sentences (first spelling seen), in first-seen order.
    counts: np.ndarray  # int64 [M]: occurrences in the training reports.
    embeddings: np.ndarray  # float32 [M, D]: L2-normalised text-tower embeddings.
    labels: np.ndarray  # float32 [M, 14]: `label_report` of each sentence.
    report_labels: np.ndarray  # float32 [S, 14]: `label_report` of each study's report.
    most_common_report: str  # The most frequent training report (first seen at a tie).
    most_common_count: int

    def __post_init__(self):
        m = len(self.sentences)
        if not m:
            raise ValueError("a sentence index needs at least one sentence")
        for name, rows in (("counts", self.counts), ("embeddings", self.embeddings),
                           ("labels", self.labels)):
            if len(rows) != m:
                raise ValueError(f"index {name} has {len(rows)} rows for {m} sentences")

    @property
    def num_sentences(self) -> int:
        return len(self.sentences)

    @property
    def num_studies(self) -> int:
        return int(self.report_labels.shape[0])


class Statements:
    """What each sentence states, per the labeler, for the redundancy rules.

    `stated[m, f]`: sentence m mentions finding f (its label is not blank), where No
    Finding counts as stated only by a sentence that mentions nothing else (a statement
    of normality: the labeler gives every sentence without an abnormality No Finding).
    `present[m, f]`: stated as present or possible (1 or -1). `normal[m]`, `abnormal[m]`:
    a statement of normality; states an abnormality.
    """

    def __init__(self, labels: np.ndarray):
        labels = np.asarray(labels, np.float32)
        mentioned = ~np.isnan(labels)
        others = mentioned.copy()
        others[:, _NO_FINDING] = False
        self.normal = (labels[:, _NO_FINDING] == POSITIVE) & ~others.any(axis=1)
        self.stated = others
        self.stated[:, _NO_FINDING] = self.normal
        self.present = mentioned & (labels != NEGATIVE)
        self.abnormal = (self.present & _ABNORMAL).any(axis=1)

    def conflicts(self, candidate: int, chosen: Sequence[int]) -> bool:
        """Whether `candidate` contradicts any of `chosen` on a finding."""
        if not len(chosen):
            return False
        chosen = np.asarray(chosen)
        both = self.stated[candidate] & self.stated[chosen]
        disagree = both & (self.present[candidate] != self.present[chosen])
        if disagree.any():
            return True
        return bool((self.normal[candidate] and self.abnormal[chosen].any())
                    or (self.abnormal[candidate] and self.normal[chosen].any()))

    def repeats(self, candidate: int, chosen: Sequence[int]) -> bool:
        """Whether `candidate` states a finding one of `chosen` states."""
        if not len(chosen):
            return False
        return bool((self.stated[candidate] & self.stated[np.asarray(chosen)]).any())


@dataclasses.dataclass(frozen=True)
class DraftRule:
    """How many sentences a draft takes and which candidates it skips."""

    # The defaults are `eval.draft_*`'s: chosen on the Quickstart model's validation split
    # (benchmarks/draft_sweep.py).
    k: int = 3
    max_similarity: float = 0.85  # Skip a candidate this close (cosine) to a taken one.
    distinct_findings: bool = False  # Skip a candidate stating a finding already stated.
    candidates: int = 256  # The best this many sentences per image are considered.

    def __post_init__(self):
        if self.k < 1 or self.candidates < 1:
            raise ValueError(f"draft k={self.k} and candidates={self.candidates} must be >= 1")
        if not -1.0 <= self.max_similarity <= 1.0:
            raise ValueError(f"draft max_similarity={self.max_similarity} is not in [-1, 1]")


def rule_from_config(cfg, k: int | None = None) -> DraftRule:
    """The rule of an `evaluation.eval_config` (`k`, when given, instead of `eval.draft_k`)."""
    return DraftRule(
        k=cfg.draft_k if k is None else k,
        max_similarity=cfg.draft_max_similarity,
        distinct_findings=cfg.draft_distinct_findings,
        candidates=cfg.draft_candidates,
    )


def select(
    scores: np.ndarray,
    embeddings: np.ndarray,
    statements: Statements,
    rule: DraftRule,
) -> list[int]:
    """The sentence indices of one draft, in the order taken, from one image's `scores`
    [M] of every sentence (`embeddings` [M, D], L2-normalised; see the module docstring)."""
    scores = np.asarray(scores)
    pool = min(rule.candidates, scores.shape[0])
    best = np.argpartition(-scores, pool - 1)[:pool]
    # Ties broken by index, so that drafts do not depend on the partition's order.
    order = best[np.lexsort((best, -scores[best]))]
    chosen: list[int] = []
    for candidate in order.tolist():
        if chosen:
            if np.max(embeddings[chosen] @ embeddings[candidate]) >= rule.max_similarity:
                continue
            if statements.conflicts(candidate, chosen):
                continue
            if rule.distinct_findings and statements.repeats(candidate, chosen):
                continue
        chosen.append(candidate)
        if len(chosen) == rule.k:
            break
    return chosen


class Draft:
    """Drafts of several images: sentence indices, their scores, and the draft texts."""

    def __init__(self, index: SentenceIndex, chosen: list[list[int]], scores: list[np.ndarray]):
        self.index, self.chosen, self.scores = index, chosen, scores

    def text(self, i: int) -> str:
        return " ".join(self.index.sentences[m] for m in self.chosen[i])

    @property
    def texts(self) -> list[str]:
        return [self.text(i) for i in range(len(self.chosen))]


def draft(
    image_emb: np.ndarray, index: SentenceIndex, rule: DraftRule, chunk_size: int = 256
) -> Draft:
    """The draft of every image (`image_emb` [N, D], L2-normalised)."""
    image_emb = np.asarray(image_emb, np.float32)
    embeddings = np.asarray(index.embeddings, np.float32)
    statements = Statements(index.labels)
    chosen: list[list[int]] = []
    scores: list[np.ndarray] = []
    for start in range(0, image_emb.shape[0], chunk_size):
        block = image_emb[start:start + chunk_size] @ embeddings.T
        for row in block:
            picked = select(row, embeddings, statements, rule)
            chosen.append(picked)
            scores.append(row[picked])
    return Draft(index, chosen, scores)


def label_texts(texts: Sequence[str]) -> np.ndarray:
    """float32 [N, 14]: `labeler.label_report` of each text (each distinct text once)."""
    from input_pipeline import labeler

    cache: dict[str, np.ndarray] = {}
    rows = []
    for text in texts:
        if text not in cache:
            cache[text] = labeler.label_report(text)
        rows.append(cache[text])
    if not rows:
        return np.zeros((0, NUM_FINDINGS), np.float32)
    return np.stack(rows).astype(np.float32)


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def label_agreement(
    predicted: np.ndarray, reference: np.ndarray, findings: Sequence[str]
) -> dict[str, Any]:
    """Per-finding and macro / micro precision, recall and F1 of `predicted` labels
    against `reference` labels (float32 [N, 14] each; positive = 1, see the module
    docstring). Undefined values are None."""
    predicted = np.asarray(predicted, np.float32)
    reference = np.asarray(reference, np.float32)
    if predicted.shape != reference.shape:
        raise ValueError(f"predicted labels {predicted.shape} vs reference {reference.shape}")
    per_finding: dict[str, dict[str, Any]] = {}
    totals = np.zeros(3, np.int64)
    for name in findings:
        column = FINDING_INDEX[name]
        p, r = predicted[:, column] == POSITIVE, reference[:, column] == POSITIVE
        tp, fp, fn = int(np.sum(p & r)), int(np.sum(p & ~r)), int(np.sum(~p & r))
        totals += (tp, fp, fn)
        per_finding[name] = {
            "precision": _ratio(tp, tp + fp),
            "recall": _ratio(tp, tp + fn),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "support": tp + fn,
        }
    scored = [r for r in per_finding.values() if r["support"]]

    def macro(key):
        return float(np.mean([r[key] or 0.0 for r in scored])) if scored else None

    tp, fp, fn = (int(v) for v in totals)
    return {
        "per_finding": per_finding,
        "macro": {key: macro(key) for key in ("precision", "recall", "f1")},
        "macro_findings": len(scored),
        "micro": {
            "precision": _ratio(tp, tp + fp),
            "recall": _ratio(tp, tp + fn),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        },
    }


def baseline_labels(index: SentenceIndex, num_images: int, seed: int) -> dict[str, np.ndarray]:
    """float32 [N, 14] labels of each baseline draft: `most_common_report` (that report for
    every image) and `random_report` (a training study's report drawn per image, seeded)."""
    most_common = label_texts([index.most_common_report])
    drawn = np.random.default_rng(seed).integers(index.num_studies, size=num_images)
    return {
        "most_common_report": np.repeat(most_common, num_images, axis=0),
        "random_report": np.asarray(index.report_labels, np.float32)[drawn],
    }


def drafting_report(
    image_emb: np.ndarray,
    reference_texts: Sequence[str],
    index: SentenceIndex,
    rule: DraftRule,
    findings: Sequence[str],
    *,
    seed: int = 0,
    num_examples: int = 3,
) -> dict[str, Any]:
    """The report.json section of report drafting on one split: the drafts' label
    agreement with `reference_texts` (one per row of `image_emb`) and the baselines'.
    Images whose reference text is empty (no report) are not scored."""
    if len(reference_texts) != image_emb.shape[0]:
        raise ValueError(f"{len(reference_texts)} reference texts for {image_emb.shape[0]} images")
    scored = [i for i, text in enumerate(reference_texts) if text.strip()]
    references = [reference_texts[i] for i in scored]
    drafts = draft(np.asarray(image_emb)[scored], index, rule)
    texts = drafts.texts
    reference = label_texts(references)
    baselines = baseline_labels(index, len(texts), seed)
    lengths = np.array([len(c) for c in drafts.chosen])
    return {
        "rule": dataclasses.asdict(rule),
        "index_sentences": index.num_sentences,
        "index_studies": index.num_studies,
        "num_images": len(texts),
        "num_without_reference": len(reference_texts) - len(scored),
        "mean_sentences": float(lengths.mean()) if len(lengths) else None,
        "findings": list(findings),
        "draft": label_agreement(label_texts(texts), reference, findings),
        "baselines": {
            name: label_agreement(labels, reference, findings)
            for name, labels in baselines.items()
        },
        "most_common_report": index.most_common_report,
        "examples": [
            {"draft": texts[i], "reference": references[i]}
            for i in range(min(num_examples, len(texts)))
        ],
    }


def summary_lines(section: Mapping[str, Any]) -> list[str]:
    """Console lines of a `drafting_report` section: F1 per finding, macro and micro P/R/F1,
    for the drafts and the baselines."""

    def cell(value):
        return f"{value:.3f}" if value is not None else "-"

    columns = {"draft": section["draft"], **section["baselines"]}
    names = {"draft": "draft", "most_common_report": "most common", "random_report": "random"}
    rule = section["rule"]
    lines = [
        f"report drafting: up to {rule['k']} of {section['index_sentences']} training "
        f"sentences per image (mean {cell(section['mean_sentences'])}); labeler agreement "
        "with the reference report",
        f"  {'F1':<28}" + "".join(f"{names[c]:>13}" for c in columns) + f"{'n+':>7}",
    ]
    for finding in section["findings"]:
        support = section["draft"]["per_finding"][finding]["support"]
        lines.append(
            f"  {finding:<28}"
            + "".join(f"{cell(r['per_finding'][finding]['f1']):>13}" for r in columns.values())
            + f"{support:>7}"
        )
    for average in ("macro", "micro"):
        for key in ("precision", "recall", "f1"):
            lines.append(
                f"  {f'{average} {key}':<28}"
                + "".join(f"{cell(r[average][key]):>13}" for r in columns.values())
            )
    return lines


def flat_metrics(section: Mapping[str, Any]) -> dict[str, float | None]:
    """The headline scalars of a `drafting_report` section."""
    out: dict[str, float | None] = {}
    for name, result in (("draft", section["draft"]), *section["baselines"].items()):
        prefix = "draft" if name == "draft" else f"draft_baseline_{name}"
        out[f"{prefix}_macro_f1"] = result["macro"]["f1"]
        out[f"{prefix}_micro_f1"] = result["micro"]["f1"]
    return out


__all__ = [
    "Draft",
    "DraftRule",
    "SentenceIndex",
    "Statements",
    "baseline_labels",
    "draft",
    "drafting_report",
    "flat_metrics",
    "label_agreement",
    "label_texts",
    "rule_from_config",
    "select",
    "summary_lines",
]
