"""Report drafting by retrieval: images -> draft reports made of training-report sentences.

  python -m jaxmedclip.draft_report --config experiments/tiny_synthetic.py --workdir /tmp/tiny \
      [--checkpoint STEP] --image x.png [y.png ...] [--image ...] [--k 3] \
      [--out drafts.csv|drafts.json] [--index auto|rebuild|existing] [--config.eval.x=...]

CXR-RePaiR style: every distinct sentence of the training split's reports is embedded
once with the text tower (the index); an image's draft is its most similar sentences,
redundant and contradicting ones skipped, up to `k` (`evaluation.drafting`: the rule;
`eval.draft_k`, `eval.draft_max_similarity`, `eval.draft_distinct_findings`).

The index lives beside the checkpoint, `<workdir>/draft_index/<STEP>/` (index.json:
sentences, their counts and a fingerprint; arrays.npz: embeddings and labels). Reports
are the text the model reads (`data.text`: findings and impression, or one of them), split
into sentences as the input pipeline splits them (`reports.split_sentences`) and
deduplicated after normalisation (`tokenizer.normalize_text`), counting occurrences. The
fingerprint records the dataset, split, text section, tokenizer (its SHA-256),
`max_text_len`, the text tower's config, the sentence splitter's and labeler's code, and
the step; on loading, the first sentences are also embedded again and compared, so an
index built by other weights is noticed too. `--index auto` (default) builds a missing
or stale index, `rebuild` always builds (without `--image`: build and exit), `existing`
refuses a missing or stale one with the reason.

Images are read and preprocessed exactly as `python -m jaxmedclip.predict` reads them
(`predict.image_batches`); an unreadable one gets a row with the reason. The console gets
each draft with each sentence's similarity; `--out` writes a CSV (image, draft, findings:
the labeler's positive findings of the draft, similarities, error) or, for a .json path,
a list of objects with the same content.
"""

from __future__ import annotations

import argparse
import collections
import csv
import hashlib
import inspect
import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any, NamedTuple

import ml_collections
import numpy as np

from jaxmedclip import config_lib, evaluation, parallel, predict, training
from jaxmedclip.evaluation import drafting, embed

log = logging.getLogger("jaxmedclip.draft_report")

INDEX_FORMAT = 1
INDEX_SPLIT = "train"
INDEX_DIR = "draft_index"
INDEX_MODES = ("auto", "rebuild", "existing")
# Sentences embedded again on loading, to notice an index built by other weights.
CHECK_SENTENCES = 8
CHECK_MIN_COSINE = 0.999


class EmptyIndexError(ValueError):
    """The training split holds no report sentence: there is nothing to draft from."""


class StaleIndexError(ValueError):
    """An index on disk does not belong to this checkpoint, tokenizer, data or code."""


def index_dir(workdir: str, step: int) -> str:
    return os.path.join(workdir, INDEX_DIR, str(step))


def report_text(findings: str, impression: str, section: str) -> str:
    """The text of a report the model reads under `data.text` = `section`, as the input
    pipeline selects it (`stages.text.select_text`: an empty section falls back to the
    other)."""
    findings, impression = findings.strip(), impression.strip()
    if section == "findings":
        return findings or impression
    if section == "impression":
        return impression or findings
    return " ".join(t for t in (findings, impression) if t)


class TrainingReports(NamedTuple):
    """A split's reports, one per study, and their distinct sentences with counts."""

    reports: list[str]
    sentences: list[str]
    counts: list[int]


def collect_sentences(reports: Sequence[str]) -> TrainingReports:
    """The distinct sentences of `reports` (split as the input pipeline splits them; equal
    after `normalize_text` is the same sentence, first spelling kept) with occurrence
    counts, in first-seen order. Empty reports are kept in `reports` (they count as
    studies for the random-report baseline) but give no sentences."""
    from input_pipeline.reports import split_sentences
    from input_pipeline.tokenizer import normalize_text

    spelling: dict[str, str] = {}
    counts: collections.Counter[str] = collections.Counter()
    for report in reports:
        for sentence in split_sentences(report):
            key = normalize_text(sentence)
            if key:
                spelling.setdefault(key, sentence)
                counts[key] += 1
    return TrainingReports(list(reports), list(spelling.values()), [counts[k] for k in spelling])


def read_reports(builder, data_config: ml_collections.ConfigDict,
                 split: str = INDEX_SPLIT) -> list[str]:
    """Each study's report text in `split` (`report_text` of its sections), once per study."""
    from input_pipeline.tokenizer import split_study_texts

    return [
        report_text(findings, impression, data_config.text)
        for findings, impression in split_study_texts(builder, split, ("findings", "impression"))
    ]


def dataset_id(builder, split: str = INDEX_SPLIT) -> str:
    """What identifies the records of `split`: builder, configuration, version, size."""
    config = getattr(builder, "builder_config", None)
    size = builder.info.splits[split].num_examples
    return f"{builder.name}/{config.name if config else ''}/{builder.version}/{split}:{size}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def index_fingerprint(config: ml_collections.ConfigDict, dataset: str, tokenizer,
                      step: int) -> dict[str, Any]:
    """What an index depends on, besides the text tower's weights (checked by embedding)."""
    from input_pipeline import labeler, reports

    with open(tokenizer.model_path, "rb") as f:
        tokenizer_sha = _sha256(f.read())
    code = "".join(inspect.getsource(m) for m in (reports, labeler)).encode()
    text_tower = json.dumps(config.model.text.to_dict(), sort_keys=True, default=str)
    return {
        "format": INDEX_FORMAT,
        "step": step,
        "dataset": dataset,
        "text": config.data.text,
        "tokenizer_sha256": tokenizer_sha,
        "max_text_len": tokenizer.max_len,
        "text_tower_sha256": _sha256(text_tower.encode()),
        "splitter_labeler_sha256": _sha256(code),
    }


def embed_sentences(embedder: embed.Embedder, params, tokenizer, sentences: Sequence[str],
                    chunk_size: int) -> np.ndarray:
    """float32 [M, D] text embeddings of `sentences`, `chunk_size` rows per call (the last
    chunk padded, so that one compilation serves them all)."""
    tokens = tokenizer.encode_batch(list(sentences))
    out = []
    for start in range(0, len(tokens), chunk_size):
        chunk = tokens[start:start + chunk_size]
        padded = np.concatenate([chunk, np.repeat(chunk[:1], chunk_size - len(chunk), axis=0)])
        out.append(embedder.embed_tokens(params, padded)[: len(chunk)])
    return np.concatenate(out).astype(np.float32)


def build_index(reports: Sequence[str], embed_fn) -> drafting.SentenceIndex:
    """The index of `reports` (one per study): sentences embedded by `embed_fn`
    (list of texts -> float32 [M, D]) and labelled, reports labelled for the baselines."""
    collected = collect_sentences(reports)
    if not collected.sentences:
        raise EmptyIndexError(
            f"the {len(collected.reports)} studies of the training split hold no report "
            "sentence, so there is nothing to draft from: report drafting needs a dataset "
            "with reports"
        )
    texts = collections.Counter(r for r in collected.reports if r.strip())
    most_common, count = texts.most_common(1)[0]
    return drafting.SentenceIndex(
        sentences=collected.sentences,
        counts=np.asarray(collected.counts, np.int64),
        embeddings=np.asarray(embed_fn(collected.sentences), np.float32),
        labels=drafting.label_texts(collected.sentences),
        report_labels=drafting.label_texts(collected.reports),
        most_common_report=most_common,
        most_common_count=count,
    )


def save_index(directory: str, index: drafting.SentenceIndex,
               fingerprint: dict[str, Any]) -> None:
    """Writes the index to `directory`, replacing any there (never half-written: it is
    written beside and renamed)."""
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    scratch = os.path.join(parent, f".{os.path.basename(directory)}.{uuid.uuid4().hex}")
    os.makedirs(scratch)
    try:
        np.savez(os.path.join(scratch, "arrays.npz"), embeddings=index.embeddings,
                 labels=index.labels, report_labels=index.report_labels)
        with open(os.path.join(scratch, "index.json"), "w") as f:
            json.dump({"fingerprint": fingerprint, "sentences": index.sentences,
                       "counts": index.counts.tolist(),
                       "most_common_report": index.most_common_report,
                       "most_common_count": index.most_common_count}, f, indent=1)
            f.write("\n")
        old = None
        if os.path.exists(directory):
            old = f"{scratch}.old"
            os.replace(directory, old)
        os.replace(scratch, directory)
        if old:
            shutil.rmtree(old)
    finally:
        if os.path.exists(scratch):
            shutil.rmtree(scratch)


def load_index(directory: str, fingerprint: dict[str, Any],
               embed_fn=None) -> drafting.SentenceIndex:
    """The index in `directory`; StaleIndexError naming what differs when its fingerprint
    is not `fingerprint` or (with `embed_fn`) its first sentences embed differently now;
    FileNotFoundError when there is none."""
    path = os.path.join(directory, "index.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no draft index in {directory}")
    with open(path) as f:
        stored = json.load(f)
    differ = [
        f"{key} {stored['fingerprint'].get(key)!r} (now {value!r})"
        for key, value in fingerprint.items()
        if stored["fingerprint"].get(key) != value
    ]
    if differ:
        raise StaleIndexError(f"the draft index in {directory} was built with other "
                              f"{'; '.join(differ)}")
    with np.load(os.path.join(directory, "arrays.npz")) as arrays:
        index = drafting.SentenceIndex(
            sentences=stored["sentences"],
            counts=np.asarray(stored["counts"], np.int64),
            embeddings=arrays["embeddings"],
            labels=arrays["labels"],
            report_labels=arrays["report_labels"],
            most_common_report=stored["most_common_report"],
            most_common_count=stored["most_common_count"],
        )
    if embed_fn is not None:
        check = index.sentences[:CHECK_SENTENCES]
        cosine = np.sum(embed_fn(check) * index.embeddings[: len(check)], axis=1)
        if np.min(cosine) < CHECK_MIN_COSINE:
            raise StaleIndexError(
                f"the draft index in {directory} was embedded by other weights than this "
                f"checkpoint's text tower (cosine {np.min(cosine):.4f} between its stored "
                "and a fresh embedding of the same sentence)"
            )
    return index


def ensure_index(directory: str, fingerprint: dict[str, Any], read_reports_fn, embed_fn,
                 mode: str = "auto") -> drafting.SentenceIndex:
    """The index in `directory`: loaded if current; built from `read_reports_fn()` and saved
    when missing or stale (`mode` auto), always (rebuild), or never (existing: the reason
    is raised)."""
    if mode not in INDEX_MODES:
        raise ValueError(f"index mode {mode!r}; expected one of {INDEX_MODES}")
    if mode != "rebuild":
        try:
            return load_index(directory, fingerprint, embed_fn)
        except (FileNotFoundError, StaleIndexError) as e:
            if mode == "existing":
                raise StaleIndexError(f"{e}; build it with --index rebuild") from None
            log.info("%s: building it", e)
    start = time.perf_counter()
    reports = read_reports_fn()
    index = build_index(reports, embed_fn)
    save_index(directory, index, fingerprint)
    log.info(
        "draft index: %d distinct sentences of %d studies, built in %.1f s: %s",
        index.num_sentences, index.num_studies, time.perf_counter() - start, directory,
    )
    return index


def model_index(config: ml_collections.ConfigDict, builder, tokenizer,
                embedder: embed.Embedder, params, workdir: str, step: int,
                mode: str = "auto") -> drafting.SentenceIndex:
    """`ensure_index` of checkpoint `step` of `workdir` over `builder`'s training split."""
    cfg = evaluation.eval_config(config)
    fingerprint = index_fingerprint(config, dataset_id(builder), tokenizer, step)

    def embed_fn(texts):
        return embed_sentences(embedder, params, tokenizer, texts, cfg.batch_size)

    return ensure_index(index_dir(workdir, step), fingerprint,
                        lambda: read_reports(builder, config.data), embed_fn, mode)


class DraftRow(NamedTuple):
    """One image's draft (empty when the image could not be read)."""

    image: str
    sentences: list[str]
    similarities: list[float]
    training_counts: list[int]
    findings: list[str]  # The labeler's positive findings of the draft.
    error: str

    @property
    def draft(self) -> str:
        return " ".join(self.sentences)


def draft_images(names: Sequence[str], image_emb: np.ndarray, errors: Sequence[str],
                 index: drafting.SentenceIndex, rule: drafting.DraftRule) -> list[DraftRow]:
    """The `DraftRow` of each image (rows of `image_emb` where `errors` is "")."""
    from jaxmedclip.vocabulary import CHEXPERT_FINDINGS

    ok = [i for i, e in enumerate(errors) if not e]
    drafts = drafting.draft(image_emb[ok], index, rule) if ok else None
    labels = drafting.label_texts(drafts.texts) if ok else None
    rows = [DraftRow(name, [], [], [], [], error) for name, error in zip(names, errors,
                                                                        strict=True)]
    for j, i in enumerate(ok):
        chosen = drafts.chosen[j]
        rows[i] = DraftRow(
            names[i],
            [index.sentences[m] for m in chosen],
            [float(s) for s in drafts.scores[j]],
            [int(index.counts[m]) for m in chosen],
            [f for f, v in zip(CHEXPERT_FINDINGS, labels[j], strict=True) if v == 1],
            "",
        )
    return rows


def format_row(row: DraftRow) -> str:
    """A draft for the console: the image, then one sentence a line with its similarity."""
    if row.error:
        return f"{row.image}: error: {row.error}"
    lines = [f"{row.image}:"]
    lines += [f"  {s}  ({score:.3f})" for s, score in zip(row.sentences, row.similarities,
                                                          strict=True)]
    return "\n".join(lines)


def write_drafts(path: str, rows: Sequence[DraftRow]) -> None:
    """The drafts as CSV, or as JSON for a path ending in .json (written atomically)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    if path.lower().endswith(".json"):
        records = [
            {
                "image": r.image,
                "draft": r.draft,
                "sentences": [
                    {"text": s, "similarity": round(p, 6), "training_count": c}
                    for s, p, c in zip(r.sentences, r.similarities, r.training_counts,
                                       strict=True)
                ],
                "findings": r.findings,
                "error": r.error,
            }
            for r in rows
        ]
        with open(tmp, "w") as f:
            json.dump(records, f, indent=1)
            f.write("\n")
    else:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "draft", "findings", "similarities", "error"])
            for r in rows:
                writer.writerow([r.image, r.draft, "; ".join(r.findings),
                                 "; ".join(f"{p:.4f}" for p in r.similarities), r.error])
    os.replace(tmp, path)


def parse_flags(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m jaxmedclip.draft_report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    predict.add_model_flags(parser, exported=False)
    parser.add_argument("--image", nargs="+", action="extend", default=[],
                        help="image files or folders (repeatable)")
    parser.add_argument("--k", type=int, default=None,
                        help="sentences per draft (default: eval.draft_k)")
    parser.add_argument("--out", default=None, help="drafts to write: .csv, or .json")
    parser.add_argument("--index", choices=INDEX_MODES, default="auto",
                        help="auto: build a missing or stale index; rebuild: always; "
                        "existing: refuse a missing or stale one")
    args, rest = parser.parse_known_args(argv)
    if not args.image and args.index != "rebuild":
        parser.error("give --image PATH... (or --index rebuild alone, to build the index)")
    return args, config_lib.override_flags(parser, rest)


def main(argv: Sequence[str] | None = None) -> list[DraftRow]:
    """Prints (and with --out writes) the draft of every image; returns the rows."""
    training.console_logging(sys.stderr)
    args, overrides = parse_flags(sys.argv[1:] if argv is None else argv)
    from input_pipeline import cli_errors

    with cli_errors.exit_on_user_error():
        config = config_lib.config_from_flags(args.config, overrides)
        cfg = evaluation.eval_config(config)
        rule = drafting.rule_from_config(cfg, args.k)
        images = []
        if args.image:
            images = predict.images_from_paths(args.image).names
        model = predict.load_model(config, args.workdir, args.checkpoint,
                                   tokenizer_path=args.tokenizer)
        setup, params, step, tokenizer = model.setup, model.params, model.step, model.tokenizer
        parallel.check_batch_size(cfg.batch_size, setup.mesh)
        from input_pipeline import pipeline

        builder = pipeline.build_dataset(config.data)
        embedder = embed.Embedder(setup.model, setup.mesh, setup.rules)
        index = model_index(config, builder, tokenizer, embedder, params, args.workdir, step,
                            args.index)
    if not images:
        return []
    log.info("drafting %d images with step %d of %s (up to %d sentences each)",
             len(images), step, args.workdir, rule.k)
    image_emb, errors = predict.embed_image_files(
        embedder, params, [os.path.abspath(p) for p in images], config.data, cfg.batch_size
    )
    rows = draft_images(images, image_emb, errors, index, rule)
    for row in rows:
        print(format_row(row), flush=True)
    if args.out:
        write_drafts(args.out, rows)
        log.info("wrote %s", args.out)
    return rows


if __name__ == "__main__":
    main()
