"""Report drafting by retrieval: the sentence index, the redundancy rule, the label F1
metrics and baselines (`evaluation.drafting`), and `python -m jaxmedclip.draft_report` and
`python -m jaxmedclip.evaluate`'s drafting section on the shared 2-step run (conftest
`tiny_run`, copied so that the index can be written beside its checkpoint)."""

import contextlib
import csv
import io
import json
import logging
import os
import shutil

import numpy as np
import pytest

from jaxmedclip import config_lib, draft_report, evaluate, evaluation
from jaxmedclip.evaluation import drafting, embed
from jaxmedclip.vocabulary import FINDING_INDEX, NUM_FINDINGS

STEP = 2
EFFUSION, PNEUMOTHORAX = FINDING_INDEX["Pleural Effusion"], FINDING_INDEX["Pneumothorax"]
CARDIOMEGALY, DEVICES = FINDING_INDEX["Cardiomegaly"], FINDING_INDEX["Support Devices"]
NO_FINDING = FINDING_INDEX["No Finding"]


def _labels(**values) -> np.ndarray:
    """A float32 [14] label vector: NaN except the named columns."""
    row = np.full(NUM_FINDINGS, np.nan, np.float32)
    for name, value in values.items():
        row[FINDING_INDEX[name.replace("_", " ")]] = value
    return row


# ------------------------------------------------------------------------------ the index


def test_sentences_are_split_deduplicated_and_counted():
    reports = [
        "Heart size is normal. No pleural effusion or pneumothorax.",
        "heart  size is normal. Moderate cardiomegaly. 1. Dr. Smith was called.",
        "",
        "No pleural effusion or pneumothorax.",
    ]
    collected = draft_report.collect_sentences(reports)
    # The input pipeline's splitter ("1." is a list marker, "Dr." an abbreviation); equal
    # after normalisation is one sentence, spelled as first seen.
    assert collected.sentences == [
        "Heart size is normal.",
        "No pleural effusion or pneumothorax.",
        "Moderate cardiomegaly.",
        "1. Dr. Smith was called.",
    ]
    assert collected.counts == [2, 2, 1, 1]
    assert collected.reports == reports  # The empty one still counts as a study.
    assert draft_report.report_text(" F. ", "I.", "report") == "F. I."
    assert draft_report.report_text("", "I.", "findings") == "I."
    assert draft_report.report_text("F.", "", "impression") == "F."


def _embed_fn(scale=1.0):
    """Deterministic unit embeddings of texts (a stand-in for the text tower)."""

    def embed_fn(texts):
        rows = []
        for text in texts:
            rng = np.random.default_rng(sum(map(ord, text)))
            rows.append(rng.normal(size=8) * scale)
        rows = np.asarray(rows, np.float32)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    return embed_fn


def test_index_is_built_saved_reused_and_stale_ones_are_noticed(tmp_path, caplog, monkeypatch):
    reports = ["Cardiomegaly. No pneumothorax.", "No pneumothorax.", "No pneumothorax.", ""]
    directory = str(tmp_path / "draft_index" / "7")
    fingerprint = {"format": 1, "step": 7, "tokenizer_sha256": "abc"}
    reads = []

    def read():
        reads.append(1)
        return reports

    # An entry point run earlier in this process (conftest.tiny_run) stops the package
    # logger's propagation to the root logger, where caplog listens.
    monkeypatch.setattr(logging.getLogger("jaxmedclip"), "propagate", True)
    caplog.set_level(logging.INFO, logger="jaxmedclip")
    index = draft_report.ensure_index(directory, fingerprint, read, _embed_fn())
    assert index.sentences == ["Cardiomegaly.", "No pneumothorax."]
    assert index.counts.tolist() == [1, 3]
    assert index.labels[0, CARDIOMEGALY] == 1 and index.labels[1, PNEUMOTHORAX] == 0
    assert index.num_studies == 4 and index.report_labels.shape == (4, NUM_FINDINGS)
    assert (index.most_common_report, index.most_common_count) == ("No pneumothorax.", 2)
    stored = json.loads(open(os.path.join(directory, "index.json")).read())
    assert stored["fingerprint"] == fingerprint

    again = draft_report.ensure_index(directory, fingerprint, read, _embed_fn(), "existing")
    assert len(reads) == 1  # Loaded, not rebuilt.
    np.testing.assert_array_equal(again.embeddings, index.embeddings)
    np.testing.assert_array_equal(again.report_labels, index.report_labels)

    other = {**fingerprint, "tokenizer_sha256": "def"}
    with pytest.raises(draft_report.StaleIndexError,
                       match=r"tokenizer_sha256 'abc' \(now 'def'\).*--index rebuild"):
        draft_report.ensure_index(directory, other, read, _embed_fn(), "existing")
    # Other weights: the stored embeddings are not what the text tower gives now.
    with pytest.raises(draft_report.StaleIndexError, match="other weights"):
        draft_report.load_index(directory, fingerprint, _embed_fn(scale=-1.0))
    caplog.clear()
    draft_report.ensure_index(directory, other, read, _embed_fn(), "auto")
    assert len(reads) == 2 and "building it" in caplog.text
    assert json.loads(open(os.path.join(directory, "index.json")).read())["fingerprint"] == other
    draft_report.ensure_index(directory, other, read, _embed_fn(), "rebuild")
    assert len(reads) == 3
    assert sorted(os.listdir(tmp_path / "draft_index")) == ["7"]  # No scratch left.


def test_empty_index_is_an_error(tmp_path):
    with pytest.raises(draft_report.EmptyIndexError, match="hold no report sentence"):
        draft_report.ensure_index(str(tmp_path / "i"), {}, lambda: ["", "  "], _embed_fn())
    assert not os.path.exists(tmp_path / "i")


# ------------------------------------------------------------------- the redundancy rule


def _table():
    """Six sentences: embeddings in 3-d and hand-made labels."""
    sentences = [
        "Moderate right pleural effusion.",  # 0
        "There is a moderate right pleural effusion.",  # 1: near 0 (cosine 0.98)
        "No pleural effusion or pneumothorax.",  # 2: contradicts 0 on the effusion
        "No acute cardiopulmonary process.",  # 3: normality, contradicts 0
        "Right pleural effusion and a small pneumothorax.",  # 4: repeats 0's effusion
        "Heart size is normal.",  # 5
        "Support devices in standard position.",  # 6: not an abnormality
    ]
    labels = np.stack([
        _labels(Pleural_Effusion=1),
        _labels(Pleural_Effusion=1),
        _labels(No_Finding=1, Pleural_Effusion=0, Pneumothorax=0),
        _labels(No_Finding=1),
        _labels(Pleural_Effusion=1, Pneumothorax=1),
        _labels(No_Finding=1, Cardiomegaly=0),
        _labels(No_Finding=1, Support_Devices=1),
    ])
    angle = np.arccos(0.98)
    embeddings = np.array([
        [1, 0, 0], [np.cos(angle), np.sin(angle), 0], [0, 1, 0], [0, 0, 1],
        [0.6, 0.8, 0], [0, 0.6, 0.8], [0.8, 0, 0.6],
    ], np.float32)
    index = drafting.SentenceIndex(
        sentences=sentences, counts=np.ones(7, np.int64), embeddings=embeddings,
        labels=labels, report_labels=labels[:1], most_common_report=sentences[0],
        most_common_count=1,
    )
    return index, drafting.Statements(labels)


def test_statements_and_the_redundancy_rule_at_value_level():
    index, statements = _table()
    assert statements.normal.tolist() == [False, False, False, True, False, False, False]
    assert statements.abnormal.tolist() == [True, True, False, False, True, False, False]
    assert statements.conflicts(2, [0]) and statements.conflicts(0, [2])
    assert statements.conflicts(3, [0]) and statements.conflicts(0, [3])
    assert not statements.conflicts(5, [0]) and not statements.conflicts(6, [3])
    assert statements.repeats(4, [0]) and not statements.conflicts(4, [0])
    assert statements.repeats(2, [5]) is False  # "normal" heart vs the pleura.

    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    # 1 too similar to 0, 2 and 3 contradict 0, 4 repeats 0's effusion.
    rule = drafting.DraftRule(k=3, max_similarity=0.95, distinct_findings=True)
    assert drafting.select(scores, index.embeddings, statements, rule) == [0, 5, 6]
    # Same finding allowed: 4 comes in; a looser cosine lets 1 in too; contradictions
    # never do.
    rule = drafting.DraftRule(k=3, max_similarity=0.95, distinct_findings=False)
    assert drafting.select(scores, index.embeddings, statements, rule) == [0, 4, 5]
    rule = drafting.DraftRule(k=3, max_similarity=0.99, distinct_findings=False)
    assert drafting.select(scores, index.embeddings, statements, rule) == [0, 1, 4]
    # A normal image: the statements of normality first; the effusion contradicts them.
    scores = np.array([0.1, 0.1, 0.9, 0.8, 0.2, 0.7, 0.3])
    rule = drafting.DraftRule(k=4, max_similarity=0.95)
    assert drafting.select(scores, index.embeddings, statements, rule) == [2, 3, 5, 6]
    # Only the best `candidates` are considered: the draft may come out shorter.
    rule = drafting.DraftRule(k=4, max_similarity=0.95, candidates=2)
    assert drafting.select(scores, index.embeddings, statements, rule) == [2, 3]

    drafts = drafting.draft(index.embeddings[[0, 2]], index,
                            drafting.DraftRule(k=2, max_similarity=0.95))
    # Image 0 is sentence 0's embedding: 1 is too close to it, 6 next; image 1 is 2's: 4
    # contradicts it, 5 next.
    assert drafts.chosen == [[0, 6], [2, 5]]
    assert drafts.texts[1] == "No pleural effusion or pneumothorax. Heart size is normal."
    np.testing.assert_allclose(drafts.scores[0], [1.0, 0.8], atol=1e-6)
    with pytest.raises(ValueError, match="k=0"):
        drafting.DraftRule(k=0)


# ------------------------------------------------------------------ metrics and baselines


def test_label_agreement_by_hand():
    # Five images; Cardiomegaly: predicted [1, 1, 0, 0, -1], reference [1, 0, 1, 1, 1]
    # -> TP 1, FP 1, FN 3 (uncertain is not positive): P 1/2, R 1/4, F1 2/6.
    # Edema: never predicted, reference positive once -> P undefined (0 in the macro), R 0.
    # Pneumothorax: no reference positive -> left out of the macro; predicted once: FP 1.
    predicted = np.stack([
        _labels(Cardiomegaly=1, Pneumothorax=1),
        _labels(Cardiomegaly=1),
        _labels(Cardiomegaly=0),
        _labels(),
        _labels(Cardiomegaly=-1),
    ])
    reference = np.stack([
        _labels(Cardiomegaly=1),
        _labels(Cardiomegaly=0),
        _labels(Cardiomegaly=1, Edema=1),
        _labels(Cardiomegaly=1),
        _labels(Cardiomegaly=1, Pneumothorax=0),
    ])
    result = drafting.label_agreement(predicted, reference,
                                      ["Cardiomegaly", "Edema", "Pneumothorax"])
    cardio = result["per_finding"]["Cardiomegaly"]
    assert (cardio["tp"], cardio["fp"], cardio["fn"], cardio["support"]) == (1, 1, 3, 4)
    assert cardio["precision"] == 0.5 and cardio["recall"] == 0.25
    assert cardio["f1"] == pytest.approx(1 / 3)
    edema = result["per_finding"]["Edema"]
    assert edema["precision"] is None and edema["recall"] == 0 and edema["f1"] == 0
    ptx = result["per_finding"]["Pneumothorax"]
    assert (ptx["precision"], ptx["recall"], ptx["f1"], ptx["support"]) == (0, None, 0, 0)
    assert result["macro_findings"] == 2
    assert result["macro"]["precision"] == pytest.approx((0.5 + 0) / 2)
    assert result["macro"]["recall"] == pytest.approx((0.25 + 0) / 2)
    assert result["macro"]["f1"] == pytest.approx((1 / 3 + 0) / 2)
    # Micro: TP 1, FP 2, FN 4.
    assert result["micro"]["precision"] == pytest.approx(1 / 3)
    assert result["micro"]["recall"] == pytest.approx(1 / 5)
    assert result["micro"]["f1"] == pytest.approx(2 / 8)
    from sklearn.metrics import f1_score

    assert cardio["f1"] == pytest.approx(
        f1_score(reference[:, CARDIOMEGALY] == 1, predicted[:, CARDIOMEGALY] == 1))


def test_baselines_and_report_section():
    index, _ = _table()
    report_labels = np.stack([_labels(Cardiomegaly=1), _labels(No_Finding=1),
                              _labels(Edema=1)])
    index = drafting.SentenceIndex(
        sentences=index.sentences, counts=index.counts, embeddings=index.embeddings,
        labels=index.labels, report_labels=report_labels,
        most_common_report="No acute cardiopulmonary process.", most_common_count=2,
    )
    baselines = drafting.baseline_labels(index, 5, seed=3)
    expected = np.full((5, NUM_FINDINGS), np.nan, np.float32)
    expected[:, NO_FINDING] = 1  # The labeler's reading of the most common report.
    np.testing.assert_array_equal(baselines["most_common_report"], expected)
    drawn = np.random.default_rng(3).integers(3, size=5)
    np.testing.assert_array_equal(baselines["random_report"], report_labels[drawn])
    np.testing.assert_array_equal(drafting.baseline_labels(index, 5, seed=3)["random_report"],
                                  baselines["random_report"])

    # Two images, their references labelled by the labeler: the drafts agree exactly. A
    # third without a report is not scored.
    references = ["Moderate right pleural effusion.", "", "No acute cardiopulmonary process."]
    section = drafting.drafting_report(
        index.embeddings[[0, 1, 3]], references, index,
        drafting.DraftRule(k=1), ["No Finding", "Pleural Effusion"], seed=0)
    assert (section["num_images"], section["num_without_reference"]) == (2, 1)
    assert section["draft"]["macro"]["f1"] == 1.0
    assert section["baselines"]["most_common_report"]["per_finding"]["No Finding"]["f1"] == (
        pytest.approx(2 / 3))
    assert section["examples"][0] == {"draft": references[0], "reference": references[0]}
    assert drafting.flat_metrics(section)["draft_macro_f1"] == 1.0
    # In report.json's flat scalars and console table.
    report = {"step": 1, "split": "test", "num_examples": 2, "drafting": section}
    flat = evaluation.report.flat_metrics(report)
    assert flat["eval/draft_macro_f1"] == 1.0
    assert flat["eval/draft_baseline_most_common_report_micro_f1"] == pytest.approx(
        section["baselines"]["most_common_report"]["micro"]["f1"])
    text = evaluation.report.summary_table(report)
    assert "report drafting: up to 1 of 7 training sentences" in text
    assert "most common" in text and "macro f1" in text


# ------------------------------------------------------------------ the tiny trained run


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory):
    """A copy of the shared 2-step run, so that indexes can be written beside it."""
    pytest.importorskip("input_pipeline.pipeline")
    experiment, workdir = tiny_run
    copy = str(tmp_path_factory.mktemp("draft_run") / "work")
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("tensorboard"))
    return experiment, copy


@pytest.fixture(scope="module")
def images(run, tmp_path_factory):
    """Four validation images as PNG files, a broken PNG and a missing path."""
    import tensorflow_datasets as tfds

    from input_pipeline import pipeline

    experiment, _ = run
    builder = pipeline.build_dataset(config_lib.load_config(experiment).data)
    source = builder.as_data_source("validation", decoders={"image": tfds.decode.SkipDecoding()})
    folder = tmp_path_factory.mktemp("draft_images")
    paths = []
    for i in range(4):
        path = folder / f"{i}.png"
        path.write_bytes(source[i]["image"])
        paths.append(str(path))
    (folder / "broken.png").write_bytes(source[0]["image"][:40])
    return paths, str(folder / "broken.png"), str(folder / "absent.png")


@pytest.fixture(scope="module")
def drafted(run, images, tmp_path_factory):
    """`python -m jaxmedclip.draft_report` on the run (building its index) for two
    validation images, a broken PNG, another image and a missing path, with --k 3 and
    --out drafts.json: (returned rows, printed text, the JSON file)."""
    experiment, workdir = run
    paths, broken, absent = images
    out = tmp_path_factory.mktemp("drafts") / "drafts.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rows = draft_report.main(["--config", experiment, "--workdir", workdir, "--image",
                                  *paths[:2], "--image", broken, paths[2], absent, "--k", "3",
                                  "--out", str(out)])
    return rows, printed.getvalue(), out


def test_cli_drafts_images_from_the_checkpoints_index(run, images, drafted, tmp_path):
    import jax
    import tensorflow_datasets as tfds

    from input_pipeline import pipeline, reports
    from input_pipeline.tokenizer import Tokenizer

    experiment, workdir = run
    paths, broken, absent = images
    rows, printed, out = drafted
    assert [r.image for r in rows] == [*paths[:2], broken, paths[2], absent]
    assert [bool(r.error) for r in rows] == [False, False, True, False, True]
    assert f"{absent}: error: " in printed and f"{paths[0]}:" in printed

    # The index: the training reports' distinct sentences, embedded by the text tower.
    config = config_lib.load_config(experiment)
    builder = pipeline.build_dataset(config.data)
    source = builder.as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})
    expected = set()
    for i in range(len(source)):
        example = source[i]
        text = draft_report.report_text(example["findings"].decode(),
                                        example["impression"].decode(), config.data.text)
        expected.update(s.lower() for s in reports.split_sentences(text))
    directory = draft_report.index_dir(workdir, STEP)
    stored = json.loads(open(os.path.join(directory, "index.json")).read())
    assert {s.lower() for s in stored["sentences"]} == expected
    assert len(stored["sentences"]) == len(expected)  # Deduplicated.
    tokenizer = Tokenizer(os.path.join(workdir, "tokenizer.model"), config.data.max_text_len)
    # What a later run computes: the same fingerprint, so the index is loaded, not rebuilt.
    assert stored["fingerprint"] == draft_report.index_fingerprint(
        config, draft_report.dataset_id(builder), tokenizer, STEP)
    assert stored["fingerprint"]["dataset"].startswith("synthetic_cxr/")
    setup = evaluate.model_setup(config)
    params, _ = evaluate.restore_params(setup, workdir, STEP)
    text_emb = jax.jit(lambda p, t: setup.model.apply({"params": p}, t, method="encode_text"))(
        jax.device_get(params), tokenizer.encode_batch(stored["sentences"]))
    index = draft_report.load_index(directory, stored["fingerprint"])
    np.testing.assert_allclose(index.embeddings, text_emb, atol=1e-5)

    # Each draft: up to k sentences in the order of their similarity, and the JSON.
    written = json.loads(out.read_text())
    for row, record in zip(rows, written, strict=True):
        assert record["image"] == row.image and record["draft"] == row.draft
        if row.error:
            assert record["error"] == row.error and not record["sentences"]
            continue
        assert 1 <= len(row.sentences) <= 3
        assert row.similarities == sorted(row.similarities, reverse=True)
        assert [s["text"] for s in record["sentences"]] == row.sentences
        assert [s["training_count"] for s in record["sentences"]] == [
            int(index.counts[index.sentences.index(s)]) for s in row.sentences]
    csv_out = tmp_path / "drafts.csv"
    draft_report.write_drafts(str(csv_out), rows)
    with open(csv_out, newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["draft"] for r in table] == [r.draft for r in rows]
    assert table[0]["findings"] == "; ".join(rows[0].findings)
    assert table[4]["error"] == rows[4].error and table[4]["draft"] == ""


def test_cli_errors_are_one_line(run, images, drafted, monkeypatch, capsys):
    experiment, workdir = run
    paths, _, _ = images
    stored = os.path.join(draft_report.index_dir(workdir, STEP), "index.json")
    original = open(stored).read()
    record = json.loads(original)
    record["fingerprint"]["tokenizer_sha256"] = "0" * 64
    open(stored, "w").write(json.dumps(record))
    argv = ["--config", experiment, "--workdir", workdir, "--image", paths[0]]
    try:
        with pytest.raises(SystemExit, match=r"^error: the draft index .* tokenizer_sha256 "
                           r"'0000.*--index rebuild$"):
            draft_report.main([*argv, "--index", "existing"])
    finally:
        open(stored, "w").write(original)
    # A split without report sentences.
    monkeypatch.setattr(draft_report, "read_reports", lambda builder, data: ["", ""])
    with pytest.raises(SystemExit, match=r"^error: the 2 studies of the training split hold no "
                       "report sentence.*with reports$"):
        draft_report.main([*argv, "--index", "rebuild"])
    with pytest.raises(SystemExit):
        draft_report.main(["--config", experiment, "--workdir", workdir])
    assert "give --image" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluation_scores_drafts_against_both_baselines(run):
    from input_pipeline import pipeline

    experiment, workdir = run
    config = config_lib.load_config(experiment)
    builder, tokenizer = pipeline.prepare(config.data)
    setup = evaluate.model_setup(config)
    params, _ = evaluate.restore_params(setup, workdir, STEP)
    embedder = embed.Embedder(setup.model, setup.mesh, setup.rules)
    index = draft_report.model_index(config, builder, tokenizer, embedder, params, workdir,
                                     STEP)
    config.eval.multiclass_classes = ()
    config.eval.bootstrap_samples = 0
    result = evaluation.build_report(config, setup.model, params, setup.mesh, builder,
                                     tokenizer, split="validation", run_linear_probe=False,
                                     embedder=embedder, draft_index=index)
    section = result.report["drafting"]
    findings = list(config.eval.zero_shot_findings)
    assert section["findings"] == findings
    assert section["num_images"] == result.report["num_examples"]
    assert 1 <= section["mean_sentences"] <= config.eval.draft_k
    for name in ("draft", "most_common_report", "random_report"):
        scored = section["draft"] if name == "draft" else section["baselines"][name]
        assert set(scored["per_finding"]) == set(findings)
        assert 0 <= scored["macro"]["f1"] <= 1
    # References: the labeler's reading of each image's report; No Finding's support is
    # the number of images whose report the labeler reads as normal.
    supports = section["draft"]["per_finding"]["No Finding"]["support"]
    assert supports == section["baselines"]["random_report"]["per_finding"]["No Finding"][
        "support"] > 0
    flat = evaluation.report.flat_metrics(result.report)
    assert "eval/draft_macro_f1" in flat and "eval/draft_baseline_random_report_micro_f1" in flat
    assert "report drafting" in evaluation.report.summary_table(result.report)
