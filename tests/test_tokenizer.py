"""SentencePiece training, encoding, decoding and the TensorFlow wrapper."""

import pathlib
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

from input_pipeline import reports as report_text
from input_pipeline import synthetic_cxr, tokenizer
from input_pipeline.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer, normalize_text


@pytest.fixture(scope="module")
def reports():
    return [synthetic_cxr.generate_study(0, "train", i, source_image_size=16).report
            for i in range(300)]


@pytest.fixture(scope="module")
def model_path(reports, tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("spm") / "spm")
    return tokenizer.train_sentencepiece(reports, prefix, vocab_size=300)


def test_normalize_text():
    assert normalize_text("  The HEART\n is\tNormal.  ") == "the heart is normal."
    assert normalize_text(b"No  Effusion") == "no effusion"
    assert normalize_text(normalize_text("A  b")) == "a b"


def test_special_ids_and_vocab(model_path):
    tok = Tokenizer(model_path, max_len=32)
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert 50 < tok.vocab_size <= 300


def test_round_trip_is_the_normalised_text(model_path, reports):
    tok = Tokenizer(model_path, max_len=512)
    tokens = tok.encode_batch(reports[:50])
    for row, report in zip(tokens, reports[:50], strict=True):
        assert tok.decode(row) == normalize_text(report)
        assert tok.unk_id not in row


def test_rows_are_bos_pieces_eos_then_padding(model_path, reports):
    long_enough = Tokenizer(model_path, max_len=512).encode_batch(reports[:20])
    tok = Tokenizer(model_path, max_len=24)
    tokens = tok.encode_batch(reports[:20] + ["", "Cardiomegaly."])
    assert tokens.dtype == np.int32 and tokens.shape == (22, 24)
    for i, row in enumerate(tokens):
        length = int(np.count_nonzero(row))
        assert row[0] == BOS_ID and row[length - 1] == EOS_ID
        assert np.all(row[length:] == PAD_ID) and EOS_ID not in row[1:length - 1]
        if i < 20:  # Truncated reports keep their first pieces, then EOS.
            full_length = int(np.count_nonzero(long_enough[i]))
            assert full_length > 24 and length == 24
            np.testing.assert_array_equal(row[:23], long_enough[i][:23])
    np.testing.assert_array_equal(tokens[20][:3], [BOS_ID, EOS_ID, PAD_ID])


def test_tf_encode_equals_encode_batch(model_path, reports):
    import tensorflow as tf

    tok = Tokenizer(model_path, max_len=40)
    texts = reports[:7] + ["Possible small LEFT effusion."]
    expected = tok.encode_batch(texts)
    tokens = tok.tf_encode(tf.constant(texts))
    assert tokens.dtype == tf.int32 and tokens.shape.as_list() == [8, 40]
    np.testing.assert_array_equal(tokens.numpy(), expected)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def in_graph(batch):
        return tok.tf_encode(batch)

    assert in_graph.get_concrete_function().output_shapes.as_list() == [None, 40]
    np.testing.assert_array_equal(in_graph(tf.constant(texts)).numpy(), expected)


def test_training_is_deterministic(reports, model_path, tmp_path):
    again = tokenizer.train_sentencepiece(reports, str(tmp_path / "again"), vocab_size=300)
    pieces = []
    for path in (model_path, again):
        processor = spm.SentencePieceProcessor(model_file=path)
        pieces.append([(processor.id_to_piece(i), processor.get_score(i))
                       for i in range(processor.get_piece_size())])
    assert pieces[0] == pieces[1]


def test_small_corpus_gives_a_smaller_vocabulary(tmp_path):
    path = tokenizer.train_sentencepiece(["no acute process."] * 20, str(tmp_path / "tiny"),
                                         vocab_size=1000, model_type="bpe")
    assert 4 < Tokenizer(path, max_len=8).vocab_size < 1000


def test_rejects_models_with_other_special_ids(reports, tmp_path):
    spm.SentencePieceTrainer.train(sentence_iterator=iter(reports), model_prefix=str(
        tmp_path / "default_ids"), vocab_size=100, hard_vocab_limit=False, minloglevel=2)
    with pytest.raises(ValueError, match="special ids"):
        Tokenizer(str(tmp_path / "default_ids.model"), max_len=8)
    with pytest.raises(ValueError, match="max_len"):
        Tokenizer(str(tmp_path / "default_ids.model"), max_len=1)


def test_light_modules_do_not_import_tensorflow():
    code = ("import sys; import input_pipeline.tokenizer, input_pipeline.findings, "
            "input_pipeline.synthetic_cxr; "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
    repo_root = pathlib.Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo_root)


def test_in_graph_equals_python_on_many_texts(model_path, reports):
    import tensorflow as tf

    sections = [part for r in reports[:200] for part in r.split("\n\n")]
    edge_cases = ["", "   ", "\t\n", "Ünïcödé  ½ cm — opacity.", "A" * 2000,
                  "no acute cardiopulmonary process. " * 40, "x", "Mild\u00a0edema."]
    texts = reports + sections + edge_cases
    for max_len in (2, 7, 48, 512):
        tok = Tokenizer(model_path, max_len=max_len)
        normalized, tokens = tok.tf_normalize_and_encode(tf.constant(texts))
        np.testing.assert_array_equal(tokens.numpy(), tok.encode_batch(texts))
        assert [t.decode() for t in normalized.numpy()] == [normalize_text(t) for t in texts]
        rows = tokens.numpy()
        lengths = np.count_nonzero(rows, axis=1)
        assert (rows[:, 0] == BOS_ID).all()
        assert (rows[np.arange(len(rows)), lengths - 1] == EOS_ID).all()  # EOS kept.
        assert all((row[n:] == PAD_ID).all() for row, n in zip(rows, lengths, strict=True))
        assert lengths.max() <= max_len


def test_text_lengths_of_known_texts(tmp_path):
    # A word model: every word is one piece, so a text of n words is n + 2 tokens.
    words = [f"w{i}" for i in range(12)]
    path = tokenizer.train_sentencepiece([" ".join(words)] * 5, str(tmp_path / "words"),
                                         vocab_size=50, model_type="word")
    tok = Tokenizer(path, max_len=8)
    texts = [" ".join(words[:n]) for n in range(1, 11)]  # 3 .. 12 tokens.
    np.testing.assert_array_equal(tok.token_counts(texts), np.arange(3, 13))
    assert tok.token_counts(["", "W0  W1"]).tolist() == [2, 4]  # Normalised first.
    lengths = tokenizer.text_lengths(tok, texts)
    assert lengths.percentiles == {50: 7, 90: 11, 95: 12, 99: 12}
    assert (lengths.count, lengths.max, lengths.max_len) == (10, 12, 8)
    assert lengths.truncated == 4 and lengths.truncated_fraction == 0.4  # 9..12 tokens.
    # The rows the pipeline encodes hold min(count, max_len) tokens.
    rows = tok.encode_batch(texts)
    np.testing.assert_array_equal(np.count_nonzero(rows, axis=1),
                                  np.minimum(tok.token_counts(texts), 8))
    assert tokenizer.text_lengths(tok, texts[:1], percentiles=(10, 100)).percentiles == {
        10: 3, 100: 3}
    with pytest.raises(ValueError, match="no texts"):
        tokenizer.text_lengths(tok, [])


def test_deid_token_is_one_piece(reports, tmp_path):
    # Every synthetic report holds MIMIC's "___" in its indication.
    token = report_text.Placeholders("token")
    texts = [report_text.parse_report(r, token).report for r in reports]
    assert all(report_text.DEID_TOKEN in t for t in texts)
    assert normalize_text(report_text.DEID_TOKEN) == report_text.DEID_TOKEN
    # BPE: on 300 short reports a unigram model splits even "examination".
    path = tokenizer.train_sentencepiece(texts, str(tmp_path / "deid"), vocab_size=300,
                                         model_type="bpe")
    processor = spm.SentencePieceProcessor(model_file=path)
    pieces = processor.encode("seen by xxdeid on xxdeid.", out_type=str)
    assert pieces.count("\u2581" + report_text.DEID_TOKEN) == 2


def test_train_tokenizer_entry(tmp_path, capsys):
    import ml_collections

    from input_pipeline import pipeline, train_tokenizer

    experiment = tmp_path / "experiment.py"
    experiment.write_text(
        "import ml_collections\n\n"
        "def get_config(arg=None):\n"
        "    return ml_collections.ConfigDict(dict(data=dict(\n"
        f"        name='synthetic_cxr', data_dir={str(tmp_path / 'tfds')!r},\n"
        "        synthetic=dict(num_train=24, num_validation=4, num_test=4,\n"
        "                       source_image_size=16, seed=0),\n"
        "        max_text_len=32, vocab_size=200, tokenizer_type='bpe')))\n")
    out = tmp_path / "out" / "spm.model"
    train_tokenizer.main(["--config", str(experiment), "--out", str(out), "--split", "test"])
    assert Tokenizer(str(out), max_len=8).vocab_size <= 200
    # Lengths of the texts the pipeline reads (data.text "report": findings + impression),
    # once per study, measured independently of the records here.
    texts = [" ".join(synthetic_cxr.report_sections(
        synthetic_cxr.generate_study(0, "test", i, source_image_size=16).report)).strip()
        for i in range(4)]
    lengths = tokenizer.text_lengths(Tokenizer(str(out), max_len=32), texts)
    printed = capsys.readouterr().out.splitlines()
    assert printed[-4].startswith("tokenizer: ") and printed[-3].startswith("vocab_size: ")
    assert printed[-2:] == [
        "text lengths in tokens with BOS and EOS (data.text='report', split 'test', 4 "
        "studies): " + ", ".join(f"p{q} {n}" for q, n in lengths.percentiles.items())
        + f", max {lengths.max}",
        f"truncated at data.max_text_len=32: {lengths.truncated / 4:.1%} "
        f"({lengths.truncated} of 4)"]
    assert lengths.max > 32 and lengths.truncated > 0  # Synthetic reports outgrow 32.
    train_tokenizer.main(["--config", str(experiment), "--config.data.vocab_size=150"])
    # The default --out is where prepare looks: the tokenizer is reused, not retrained.
    data = ml_collections.ConfigDict(dict(
        name="synthetic_cxr", data_dir=str(tmp_path / "tfds"), max_text_len=32,
        vocab_size=150, tokenizer_type="bpe",
        synthetic=dict(num_train=24, num_validation=4, num_test=4, source_image_size=16,
                       seed=0)))
    builder = pipeline.synthetic_builder.build(data)
    path = tokenizer.tokenizer_path(data, builder)
    stamp = pathlib.Path(path).stat().st_mtime_ns
    assert tokenizer.ensure_tokenizer(data, builder).model_path == path
    assert pathlib.Path(path).stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit, match="split 'nope'"):
        train_tokenizer.main(["--config", str(experiment), "--split", "nope"])
