"""Evaluators of a two-tower model: zero-shot, multi-class prompts, retrieval, linear probe.

`build_report` embeds the splits it needs and runs every evaluator; `evaluate` is what the
training loop calls every `eval.every_steps` (flat scalars back); `python -m
jaxmedclip.evaluate` reports on a checkpoint. The pure parts (metrics, zero_shot,
retrieval, linear_probe, prompts) work on numpy arrays and need no TensorFlow; reading a
split imports `input_pipeline.pipeline` (TensorFlow) when it is first needed.

Ground truth for a finding comes from the CheXpert-style labels: positive = 1, negative =
0 or blank, uncertain (-1) left out of that finding's metrics.
"""

from __future__ import annotations

import math
import os
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from jaxmedclip import parallel
from jaxmedclip.evaluation import (
    drafting,
    embed,
    grounding,
    linear_probe,
    metrics,
    prompts,
    report,
    retrieval,
    zero_shot,
)
from jaxmedclip.vocabulary import FINDING_INDEX, LOCALISED_FINDINGS, SYNTHETIC_FINDINGS

# CheXpert 5x200 uses Atelectasis, which the synthetic data never draws: Pneumothorax
# takes its place.
MULTICLASS_CLASSES = ("Cardiomegaly", "Edema", "Consolidation", "Pleural Effusion", "Pneumothorax")
# Sections of `eval` whose keys are finding slugs: new keys are allowed there.
_OPEN_SECTIONS = ("prompts.phrases", "prompts.positive", "prompts.negative")


def default_config() -> ml_collections.ConfigDict:
    """The `config.eval` section with its defaults (experiments may set any subset)."""
    return ml_collections.ConfigDict(
        dict(
            every_steps=0,  # The training loop evaluates every N steps; 0: never.
            splits=("validation",),  # Splits the training loop evaluates.
            split="test",  # The split `python -m jaxmedclip.evaluate` reports on.
            threshold_split="validation",  # Where F1/MCC thresholds are chosen.
            probe_train_split="train",
            batch_size=256,  # Global; divisible by the batch shards of the mesh.
            max_examples=0,  # Per evaluated split; 0: all.
            seed=0,
            zero_shot_findings=SYNTHETIC_FINDINGS,
            multiclass_classes=MULTICLASS_CLASSES,  # Empty: no multi-class evaluation.
            multiclass_per_class=200,
            retrieval_ks=(1, 5, 10),
            bootstrap_samples=1000,
            confidence=0.95,
            linear_probe=True,  # In `python -m jaxmedclip.evaluate`.
            probe_during_training=False,  # It embeds the whole training split.
            probe_fractions=(0.01, 0.1, 1.0),
            probe_max_train_examples=0,  # 0: all.
            probe_regularization=1.0,  # scikit-learn's C.
            probe_max_iter=1000,
            roc_curves=True,
            # Phrase grounding (evaluation.grounding) in `python -m jaxmedclip.evaluate`,
            # where the split's records mark the findings' regions (synthetic_cxr >= 1.5.0).
            grounding=True,
            grounding_findings=LOCALISED_FINDINGS,
            # Sigma (pixels) of the Gaussian that spreads the maps; None: the local head's
            # stride for maps over a head, else 0 (grounding.map_spread).
            grounding_spread=None,
            # Report drafting by sentence retrieval (evaluation.drafting), in `python -m
            # jaxmedclip.evaluate`: label F1 of drafts against the reference reports.
            drafting=True,
            # k and the thresholds: the best macro F1 on the Quickstart model's validation
            # split (docs/applications.md).
            draft_k=3,  # Sentences per draft.
            draft_max_similarity=0.85,  # Skip a candidate this close (cosine) to a taken one.
            draft_distinct_findings=False,  # Skip a candidate stating a finding already stated.
            draft_candidates=256,  # The best N sentences of each image are considered.
            prompts=prompts.default_prompt_config(),
        )
    )


def _merge(base: ml_collections.ConfigDict, update, path: str = "") -> None:
    for key, value in update.items():
        where = f"{path}.{key}" if path else key
        if key not in base:
            if path in _OPEN_SECTIONS:
                base[key] = value
                continue
            valid = ", ".join(sorted(base.keys()))
            raise KeyError(f"unknown field eval.{where}; valid fields here: {valid}")
        if isinstance(base[key], ml_collections.ConfigDict):
            if not isinstance(value, (ml_collections.ConfigDict, dict)):
                raise ValueError(f"eval.{where} is a group of fields, not {value!r}")
            _merge(base[key], value, where)
        else:
            base[key] = value


def eval_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config.eval` over the defaults (a config without `eval` gets all defaults)."""
    cfg = ml_collections.ConfigDict(default_config().to_dict(), type_safe=False)
    override = config.get("eval")
    if override is not None:
        _merge(cfg, override)
    for field in ("zero_shot_findings", "multiclass_classes"):
        unknown = [f for f in cfg[field] if f not in FINDING_INDEX]
        if unknown:
            raise ValueError(
                f"eval.{field} names unknown findings {unknown}; known: {sorted(FINDING_INDEX)}"
            )
    if cfg.bootstrap_samples < 0 or not 0 < cfg.confidence < 1:
        raise ValueError(
            f"eval.bootstrap_samples={cfg.bootstrap_samples} must be >= 0 and "
            f"eval.confidence={cfg.confidence} in (0, 1)"
        )
    return cfg


class EvalResult(NamedTuple):
    report: dict[str, Any]  # JSON-ready.
    roc_curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]  # plot -> class -> data


def _label_columns(names) -> list[int]:
    return [FINDING_INDEX[name] for name in names]


def _prompt_embeddings(embedder, params, tokenizer, texts) -> dict[str, np.ndarray]:
    texts = list(dict.fromkeys(texts))
    embeddings = embedder.embed_tokens(params, tokenizer.encode_batch(texts))
    return dict(zip(texts, embeddings, strict=True))


class ZeroShotHead(NamedTuple):
    """What turns image embeddings into zero-shot finding probabilities: each finding's
    positive and negative prompt-ensemble embeddings and the model's logit scale."""

    findings: tuple[str, ...]
    prompt_sets: dict[str, prompts.PromptSet]
    positive: np.ndarray  # float32 [C, D], one ensemble per finding.
    negative: np.ndarray  # float32 [C, D]
    scale: float

    def probabilities(self, image_emb: np.ndarray) -> np.ndarray:
        """P(finding) [N, C] of L2-normalised image embeddings [N, D] (CheXzero binary)."""
        return zero_shot.binary_probabilities(image_emb, self.positive, self.negative, self.scale)


def zero_shot_head(
    cfg: ml_collections.ConfigDict, embedder: embed.Embedder, params, tokenizer
) -> ZeroShotHead:
    """The zero-shot head of `cfg.zero_shot_findings` under `cfg.prompts` (`cfg`: an
    `eval_config`), with the prompts embedded by `embedder`'s model at `params`."""
    findings = tuple(cfg.zero_shot_findings)
    sets = prompts.prompt_sets(findings, cfg.prompts)
    table = _prompt_embeddings(
        embedder, params, tokenizer, [p for s in sets.values() for p in (*s.positive, *s.negative)]
    )

    def ensembles(side):
        return np.stack(
            [
                zero_shot.ensemble_embedding(np.stack([table[p] for p in getattr(sets[f], side)]))
                for f in findings
            ]
        )

    return ZeroShotHead(
        findings, sets, ensembles("positive"), ensembles("negative"), embedder.scale(params)
    )


def _zero_shot(cfg, embedder, params, tokenizer, target, threshold_emb) -> tuple[dict, dict]:
    head = zero_shot_head(cfg, embedder, params, tokenizer)
    findings, sets, scale = list(head.findings), head.prompt_sets, head.scale
    columns = _label_columns(findings)
    scores = head.probabilities(target.image_emb)
    kwargs = {}
    if threshold_emb is not None:
        kwargs = dict(
            threshold_labels=threshold_emb.labels[:, columns],
            threshold_scores=head.probabilities(threshold_emb.image_emb),
        )
    labels = target.labels[:, columns]
    result = metrics.multilabel_report(
        labels,
        scores,
        findings,
        num_samples=cfg.bootstrap_samples,
        confidence=cfg.confidence,
        seed=cfg.seed,
        **kwargs,
    )
    per_class = result["per_class"]
    out = {
        "mean_auc": result["mean_auc"],
        "mean_f1": result["mean_f1"],
        "mean_mcc": result["mean_mcc"],
        "confidence": cfg.confidence,
        "bootstrap_samples": cfg.bootstrap_samples,
        "threshold_split": cfg.threshold_split or None,
        "logit_scale": scale,
        "auc": {
            name: {
                "value": r["auc"],
                "ci": r["ci"],
                "n_positive": r["n_positive"],
                "n_negative": r["n_negative"],
                "n_excluded": r["n_excluded"],
                **({"reason": r["reason"]} if "reason" in r else {}),
            }
            for name, r in per_class.items()
        },
        "threshold": {name: r["threshold"] for name, r in per_class.items()},
        "f1": {name: r["f1"] for name, r in per_class.items()},
        "mcc": {name: r["mcc"] for name, r in per_class.items()},
        "prompts": {name: s._asdict() for name, s in sets.items()},
    }
    targets, valid = metrics.binary_targets(labels)
    curves = {
        name: (targets[valid[:, c], c], scores[valid[:, c], c]) for c, name in enumerate(findings)
    }
    return out, curves


def _multiclass(cfg, embedder, params, tokenizer, target) -> dict:
    classes = list(cfg.multiclass_classes)
    sets = prompts.prompt_sets(classes, cfg.prompts)
    table = _prompt_embeddings(
        embedder, params, tokenizer, [p for s in sets.values() for p in s.positive]
    )
    class_emb = np.stack(
        [
            zero_shot.ensemble_embedding(np.stack([table[p] for p in sets[c].positive]))
            for c in classes
        ]
    )
    return zero_shot.multiclass_report(
        target.image_emb,
        class_emb,
        target.labels[:, _label_columns(classes)],
        classes,
        per_class=cfg.multiclass_per_class,
        seed=cfg.seed,
    )


def build_report(
    config: ml_collections.ConfigDict,
    model,
    params,
    mesh: jax.sharding.Mesh,
    builder,
    tokenizer,
    *,
    split: str,
    run_linear_probe: bool,
    step: int | None = None,
    embedder: embed.Embedder | None = None,
    run_grounding: bool = False,
    draft_index: drafting.SentenceIndex | None = None,
) -> EvalResult:
    """Embeds `split` (and the threshold / probe-training splits) and runs the evaluators.

    Pass the same `embedder` (an `embed.Embedder` of this model and mesh) to repeated calls
    to reuse its compiled functions. With `draft_index` (the training sentences embedded
    by this model: `jaxmedclip.draft_report.model_index`), report drafting is scored too.
    With `run_grounding`, phrase grounding (`grounding.grounding_report`) where the
    split's records mark the findings' regions.
    """
    cfg = eval_config(config)
    try:
        parallel.check_batch_size(cfg.batch_size, mesh)
    except ValueError as e:
        raise ValueError(f"eval.batch_size: {e}") from None
    if embedder is None:
        embedder = embed.Embedder(model, mesh, parallel.logical_rules(config))

    def embed_split(name, *, with_text, max_examples):
        from input_pipeline import pipeline  # TensorFlow only when a split is read.

        dataset = pipeline.make_dataset(
            config.data,
            builder,
            tokenizer,
            name,
            global_batch_size=cfg.batch_size,
            train=False,
            seed=cfg.seed,
        )
        if max_examples:
            dataset = dataset.take(math.ceil(max_examples / cfg.batch_size))
        return embedder.embed_batches(params, dataset.as_numpy_iterator(), with_text=with_text)

    target = embed_split(split, with_text=True, max_examples=cfg.max_examples)
    out: dict[str, Any] = {"step": step, "split": split, "num_examples": target.num_examples}
    curves: dict[str, dict] = {}

    if cfg.zero_shot_findings:
        threshold_emb = None
        if cfg.threshold_split == split:
            threshold_emb = target
        elif cfg.threshold_split:
            threshold_emb = embed_split(
                cfg.threshold_split, with_text=False, max_examples=cfg.max_examples
            )
        out["zero_shot"], curves["zero_shot"] = _zero_shot(
            cfg, embedder, params, tokenizer, target, threshold_emb
        )
    if cfg.multiclass_classes:
        out["multiclass"] = _multiclass(cfg, embedder, params, tokenizer, target)
    out["retrieval"] = retrieval.retrieval_report(
        target.image_emb, target.text_emb, target.text_keys(), tuple(cfg.retrieval_ks)
    )
    if draft_index is not None:
        if target.texts is None:
            raise ValueError("report drafting needs the split's report texts, which only a "
                             "single process reads")
        out["drafting"] = drafting.drafting_report(
            target.image_emb,
            [t.decode("utf-8") for t in target.texts],
            draft_index,
            drafting.rule_from_config(cfg),
            cfg.zero_shot_findings,
            seed=cfg.seed,
        )
    if run_linear_probe and cfg.zero_shot_findings:
        train = embed_split(
            cfg.probe_train_split, with_text=False, max_examples=cfg.probe_max_train_examples
        )
        findings = list(cfg.zero_shot_findings)
        columns = _label_columns(findings)
        probe = linear_probe.linear_probe(
            train.image_emb,
            train.labels[:, columns],
            target.image_emb,
            target.labels[:, columns],
            findings,
            fractions=tuple(cfg.probe_fractions),
            seed=cfg.seed,
            regularization=cfg.probe_regularization,
            max_iter=cfg.probe_max_iter,
        )
        out["linear_probe"] = {"train_split": cfg.probe_train_split, **probe.report}
        targets, valid = metrics.binary_targets(target.labels[:, columns])
        for label, scores in probe.test_scores.items():
            curves[f"linear_probe_{label.rstrip('%')}pct"] = {
                name: (targets[valid[:, c], c], scores[valid[:, c], c])
                for c, name in enumerate(findings)
                if not np.isnan(scores[:, c]).any()
            }
    if run_grounding:  # None where the split's records mark no regions.
        result = grounding.grounding_report(cfg, config, model, params, mesh, builder,
                                            tokenizer, split)
        if result is not None:
            out["grounding"] = result
    out["eval_config"] = cfg.to_dict()
    return EvalResult(out, curves)


def write_outputs(result: EvalResult, directory: str, *, roc_curves: bool = True) -> str:
    """Writes report.json (and ROC PNGs) into `directory`; returns the report's path."""
    path = os.path.join(directory, "report.json")
    report.write_json(path, result.report)
    if roc_curves:
        for name, curves in result.roc_curves.items():
            title = (
                f"{name.replace('_', ' ')} ROC, step {result.report['step']}, "
                f"{result.report['split']}"
            )
            report.write_roc_curves(os.path.join(directory, f"roc_{name}.png"), title, curves)
    return path


def evaluate(
    config: ml_collections.ConfigDict,
    model,
    params,
    mesh: jax.sharding.Mesh,
    builder,
    tokenizer,
    split: str = "validation",
    workdir: str | None = None,
    *,
    step: int | None = None,
    prefix: str = "eval/",
    embedder: embed.Embedder | None = None,
) -> dict[str, float]:
    """Runs the evaluators on `split`; returns flat scalars (`eval/zero_shot_mean_auc`, ...).

    For the training loop: create one `embed.Embedder(model, mesh, rules)` and pass it to
    every call, so that nothing is compiled twice; give each split its own `prefix` when
    several are evaluated. The linear probe runs only if `eval.probe_during_training`.
    With `workdir` and `step`, process 0 also writes report.json and ROC curves to
    `<workdir>/eval/<step>/<split>/`.
    """
    if workdir is not None and step is None:
        raise ValueError("evaluate(workdir=...) needs the training step to name its folder")
    cfg = eval_config(config)
    result = build_report(
        config,
        model,
        params,
        mesh,
        builder,
        tokenizer,
        split=split,
        run_linear_probe=cfg.probe_during_training,
        step=step,
        embedder=embedder,
    )
    if workdir is not None and jax.process_index() == 0:
        write_outputs(
            result, os.path.join(report.report_dir(workdir, step), split), roc_curves=cfg.roc_curves
        )
    return report.flat_metrics(result.report, prefix)


__all__ = [
    "EvalResult",
    "ZeroShotHead",
    "build_report",
    "default_config",
    "eval_config",
    "evaluate",
    "write_outputs",
    "zero_shot_head",
    "drafting",
    "embed",
    "grounding",
    "linear_probe",
    "metrics",
    "prompts",
    "report",
    "retrieval",
    "zero_shot",
]
