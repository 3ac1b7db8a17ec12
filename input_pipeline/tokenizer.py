"""SentencePiece tokenization: one definition for training, evaluation and export.

Texts are normalised by `normalize_text` (lowercase, whitespace runs collapsed) before
training and before every encoding; two reports are "the same text" when their
normalised forms are equal. Token rows are BOS + pieces + EOS, truncated so that EOS is
always the last non-pad token, right-padded with 0:

    pad=0, unk=1, bos=2, eos=3

The Python side never imports TensorFlow; `Tokenizer.tf_encode`,
`Tokenizer.tf_normalize_and_encode` and `ensure_tokenizer` import it when called.
Training, evaluation (the tf.data graph calls `tf_normalize_and_encode`) and export
(`encode_batch`) all go through `normalize_text` and `encode_normalized`.

`text_lengths` measures texts in those units (BOS and EOS included, before truncation):
percentiles and the share that `max_len` truncates, as `train_tokenizer` prints them.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import sentencepiece as spm

if TYPE_CHECKING:
    import tensorflow as tf

from jaxmedclip.vocabulary import BOS_ID, EOS_ID, PAD_ID, UNK_ID  # noqa: F401

MODEL_TYPES = ("unigram", "bpe", "char", "word")
LENGTH_PERCENTILES = (50, 90, 95, 99)


def normalize_text(text: str | bytes) -> str:
    """Lowercased text with whitespace runs collapsed to single spaces, stripped."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    return " ".join(text.lower().split())


def train_sentencepiece(texts: Iterable[str], model_prefix: str, vocab_size: int,
                        model_type: str = "unigram") -> str:
    """Trains a SentencePiece model on normalised `texts`; returns the .model path.

    Deterministic for the same texts. `vocab_size` is an upper bound: a small corpus
    yields a smaller vocabulary instead of an error.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"tokenizer model_type {model_type!r}; expected one of {MODEL_TYPES}")
    spm.set_random_generator_seed(0)
    spm.SentencePieceTrainer.train(
        sentence_iterator=(t for t in map(normalize_text, texts) if t),
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        hard_vocab_limit=False,
        character_coverage=1.0,  # Every character of the corpus gets a piece.
        normalization_rule_name="identity",  # normalize_text is the only normaliser.
        num_threads=1,  # Multithreaded training is not bit-reproducible.
        minloglevel=2,
    )
    return model_prefix + ".model"


class Tokenizer:
    """A SentencePiece model with fixed special ids and a fixed output length."""

    def __init__(self, model_path: str, max_len: int):
        if max_len < 2:
            raise ValueError(f"max_len={max_len}: a row needs at least BOS and EOS")
        self.model_path = model_path
        self.max_len = max_len
        self._processor = spm.SentencePieceProcessor(model_proto=_read_bytes(model_path))
        ids = (self._processor.pad_id(), self._processor.unk_id(), self._processor.bos_id(),
               self._processor.eos_id())
        if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise ValueError(f"{model_path} has special ids (pad, unk, bos, eos) = {ids}; "
                             f"expected {(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}: retrain it with "
                             "train_sentencepiece")

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def vocab_size(self) -> int:
        return self._processor.get_piece_size()

    @property
    def pieces(self) -> list[str]:
        """The piece of every id ("▁" starts a word), e.g. for word pooling."""
        return [self._processor.id_to_piece(i) for i in range(self.vocab_size)]

    def encode_batch(self, texts: Sequence[str | bytes]) -> np.ndarray:
        """int32 [N, max_len]: BOS + pieces + EOS, truncated keeping EOS, 0-padded."""
        return self.encode_normalized([normalize_text(t) for t in texts])

    def encode_normalized(self, normalized: Sequence[str]) -> np.ndarray:
        """`encode_batch` of texts that already went through `normalize_text`."""
        # One thread: tf.data already runs several batches at once.
        pieces = self._processor.encode(list(normalized), out_type=int, num_threads=1)
        tokens = np.zeros((len(pieces), self.max_len), dtype=np.int32)
        for row, ids in zip(tokens, pieces, strict=True):
            ids = [BOS_ID, *ids[: self.max_len - 2], EOS_ID]
            row[: len(ids)] = ids
        return tokens

    def token_counts(self, texts: Sequence[str | bytes]) -> np.ndarray:
        """int64 [N]: the length of each text's row before truncation, BOS and EOS
        included (a row holds min(count, max_len) tokens)."""
        normalized = [normalize_text(t) for t in texts]
        pieces = self._processor.encode(normalized, out_type=int, num_threads=1)
        return np.array([len(ids) + 2 for ids in pieces], dtype=np.int64)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text of one row: BOS and padding dropped, stops at the first EOS."""
        pieces = []
        for i in np.asarray(ids).tolist():
            if i == EOS_ID:
                break
            if i not in (BOS_ID, PAD_ID):
                pieces.append(i)
        return self._processor.decode(pieces)

    def tf_encode(self, texts: tf.Tensor) -> tf.Tensor:
        """`encode_batch` inside a TensorFlow graph: string [N] -> int32 [N, max_len]."""
        return self.tf_normalize_and_encode(texts)[1]

    def tf_normalize_and_encode(self, texts: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Raw texts [N] -> (normalised texts [N], `encode_batch` tokens int32 [N, max_len]).

        One `tf.numpy_function` call per batch around `normalize_text` and the Python
        processor, so the graph and `encode_batch` share a single definition
        (tensorflow-text, the in-graph SentencePiece op, needs the full `tensorflow`
        package, which conflicts with tensorflow-cpu).
        """
        tf = tensorflow_on_host()
        texts = tf.convert_to_tensor(texts, dtype=tf.string)
        texts.shape.assert_has_rank(1)

        def normalize_and_encode(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            normalized = [normalize_text(t) for t in batch.tolist()]
            encoded = np.array([t.encode("utf-8") for t in normalized], dtype=object)
            return encoded.reshape(batch.shape), self.encode_normalized(normalized)

        normalized, tokens = tf.numpy_function(
            normalize_and_encode, [texts], (tf.string, tf.int32), stateful=False,
            name="sentencepiece_encode")
        normalized.set_shape(texts.shape)
        tokens.set_shape([texts.shape[0], self.max_len])
        return normalized, tokens


class TextLengths(NamedTuple):
    """Token counts of a set of texts (`Tokenizer.token_counts`: BOS and EOS included,
    before truncation) and how many `max_len` truncates."""

    count: int
    percentiles: dict[int, int]  # q -> the smallest length that q% of the texts fit in.
    max: int
    max_len: int
    truncated: int  # Texts longer than max_len: their rows lose their end.

    @property
    def truncated_fraction(self) -> float:
        return self.truncated / self.count


def text_lengths(tokenizer: Tokenizer, texts: Sequence[str | bytes],
                 percentiles: Sequence[int] = LENGTH_PERCENTILES) -> TextLengths:
    """The length figures of `texts` under `tokenizer` (and its `max_len`)."""
    if not len(texts):
        raise ValueError("text_lengths of no texts")
    counts = tokenizer.token_counts(texts)
    # inverted_cdf: an observed length, the smallest that q% of the texts do not exceed.
    at = np.percentile(counts, list(percentiles), method="inverted_cdf")
    return TextLengths(
        count=len(counts),
        percentiles={int(q): int(v) for q, v in zip(percentiles, at, strict=True)},
        max=int(counts.max()), max_len=tokenizer.max_len,
        truncated=int(np.count_nonzero(counts > tokenizer.max_len)))


def tensorflow_on_host():
    """Imports TensorFlow with its GPUs hidden: tf.data and tokenization run on the host,
    and accelerator memory belongs to JAX. (Too late once TensorFlow has used a GPU.)"""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow already initialised its devices.
        pass
    return tf


def tokenizer_path(data_config, builder) -> str:
    """Where the tokenizer of `data_config` lives: beside the dataset's records."""
    name = f"spm_{data_config.tokenizer_type}_{data_config.vocab_size}.model"
    return os.path.join(os.fspath(builder.data_dir), "tokenizer", name)


def ensure_tokenizer(data_config, builder) -> Tokenizer:
    """The tokenizer of `data_config`, trained on the train split's reports if absent."""
    from etils import epath  # Ships with TFDS; handles local and gs:// data dirs alike.

    path = tokenizer_path(data_config, builder)
    if not epath.Path(path).exists():
        train_tokenizer(data_config, builder, path=path)
    return Tokenizer(path, data_config.max_text_len)


def train_tokenizer(data_config, builder, split: str = "train", path: str | None = None
                    ) -> str:
    """Trains the SentencePiece model of `data_config` (`vocab_size`, `tokenizer_type`)
    on the reports of `split`, once per study; writes it to `path` (default
    `tokenizer_path`, where `ensure_tokenizer` looks), replacing any model there."""
    path = path or tokenizer_path(data_config, builder)
    if not path.endswith(".model"):
        raise ValueError(f"tokenizer path {path!r} must end with .model")
    texts = _split_reports(builder, split)
    with tempfile.TemporaryDirectory() as scratch:
        model = train_sentencepiece(texts, os.path.join(scratch, "spm"),
                                    data_config.vocab_size, data_config.tokenizer_type)
        vocab = model[: -len(".model")] + ".vocab"
        _publish(vocab, path[: -len(".model")] + ".vocab")
        _publish(model, path)  # Last: its presence means the tokenizer is complete.
    return path


def _split_reports(builder, split: str) -> Iterable[str]:
    """Each study's full report in `split`, once per study (records are per image). A
    study without a report (label-only data such as CheXpert) gives its labels as the
    model reads them, `labels_to_prompt` text (one draw, seeded), so that a tokenizer can
    be trained on label-only data too; a study with neither gives nothing."""
    from input_pipeline import labeler

    rng = np.random.default_rng(0)
    for report, labels in split_study_fields(builder, split, ("report", "labels")):
        report = report.decode("utf-8")
        if report.strip():
            yield report
        elif not np.all(np.isnan(labels)):
            yield labeler.labels_to_prompt(labels, rng)


def split_study_texts(builder, split: str, fields: Sequence[str]
                      ) -> Iterator[tuple[str, ...]]:
    """The text `fields` (e.g. "report", "findings") of each study in `split`, once per
    study (records are per image), in record order."""
    for values in split_study_fields(builder, split, fields):
        yield tuple(value.decode("utf-8") for value in values)


def split_study_fields(builder, split: str, fields: Sequence[str]) -> Iterator[tuple]:
    """The record `fields` of each study in `split` as stored (bytes for text), once per
    study, in record order; images are not decoded."""
    import tensorflow_datasets as tfds

    source = builder.as_data_source(split=split,
                                    decoders={"image": tfds.decode.SkipDecoding()})
    seen = set()
    for start in range(0, len(source), 256):
        for example in source.__getitems__(range(start, min(start + 256, len(source)))):
            if example["study_id"] not in seen:
                seen.add(example["study_id"])
                yield tuple(example[field] for field in fields)


def _read_bytes(path: str) -> bytes:
    if "://" in path:  # e.g. gs://: go through etils, which ships with TFDS.
        from etils import epath

        return epath.Path(path).read_bytes()
    with open(path, "rb") as f:
        return f.read()


def _publish(local_file: str, path: str) -> None:
    """Copies to a temporary name beside `path`, then renames, so readers never see a
    half-written file."""
    from etils import epath

    target = epath.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f".{target.name}.{uuid.uuid4().hex}.partial"
    partial.write_bytes(epath.Path(local_file).read_bytes())
    partial.replace(target)
