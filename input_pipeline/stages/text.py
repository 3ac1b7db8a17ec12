"""The text stage: the text each row reads, normalised and tokenized.

`data.text`: "report" or "both" (findings and impression, joined by a space), "findings",
"impression", or "sentences" (training: a random subset of the report's sentences in
random order: `data.num_sentences` of them, else `data.sentence_fraction` of them rounded
up, else a number drawn uniformly from 1..min(all, `data.max_sentences`); with
probability `data.full_report_prob` the whole report instead; evaluation reads the
report). When the chosen section is empty, the other one is used (e.g. impression-only
reports under "findings"). A record without a report (`has_report` False) has the empty
text. Sentences are `reports.split_sentences`'s, the splitter the builders' text follows.
"""

from __future__ import annotations

import ml_collections
import numpy as np
import tensorflow as tf

from input_pipeline import reports
from input_pipeline.augment import SALT_STREAM_STRIDE, keyed_uniform, uniform
from input_pipeline.tokenizer import Tokenizer
from jaxmedclip import config_schema

TEXT_SOURCES = config_schema.TEXT_SOURCES
HASH_BUCKETS = 2**31 - 1  # Hashes fit a non-negative int32.
# Salts of the sentence draws (source.py, augment.py and the other stages: the others).
SALT_SENTENCES = 2
SALT_SENTENCE_COUNT = 3
SALT_FULL_REPORT = 4
_SENTENCE_BREAK = "\x1e"  # ASCII record separator: never in a report.


def select_text(findings: tf.Tensor, impression: tf.Tensor, text_source: str) -> tf.Tensor:
    """The text a model reads, before normalisation; "sentences" reads the report here
    (`select_sentences` then picks from it). An empty section falls back to the other."""
    findings, impression = tf.strings.strip(findings), tf.strings.strip(impression)
    if text_source in ("report", "both", "sentences"):
        return tf.strings.strip(tf.strings.join([findings, impression], separator=" "))
    if text_source == "findings":
        return tf.where(tf.strings.length(findings) > 0, findings, impression)
    if text_source == "impression":
        return tf.where(tf.strings.length(impression) > 0, impression, findings)
    raise ValueError(f"data.text={text_source!r}; expected one of {TEXT_SOURCES}")


def split_sentences(texts: tf.Tensor) -> tf.RaggedTensor:
    """string [N] -> ragged [N, None]: the sentences of each text (`reports.split_sentences`)."""
    def split(batch: np.ndarray) -> np.ndarray:
        joined = [_SENTENCE_BREAK.join(reports.split_sentences(t.decode("utf-8")))
                  for t in batch.tolist()]
        return np.array([t.encode("utf-8") for t in joined], dtype=object).reshape(batch.shape)

    joined = tf.numpy_function(split, [texts], tf.string, stateful=False,
                               name="split_sentences")
    joined.set_shape(texts.shape)
    sentences = tf.strings.split(joined, sep=_SENTENCE_BREAK)
    return tf.ragged.boolean_mask(sentences, tf.strings.length(sentences) > 0)


def select_sentences(texts: tf.Tensor, positions: tf.Tensor, seed: int,
                     num_sentences: int | None = None,
                     sentence_fraction: float | None = None,
                     max_sentences: int | None = None,
                     full_report_prob: float = 0.0, stream: int = 0) -> tf.Tensor:
    """A random subset of each text's sentences in random order, joined by spaces.

    Row i depends on (seed, positions[i]) only. The subset size is `num_sentences`
    (capped at the count), else `ceil(sentence_fraction * count)`, else drawn uniformly
    from 1..min(count, max_sentences). With probability `full_report_prob` a row keeps
    its whole text, in order (so that full reports stay in the training distribution).
    `stream` k > 0 draws independently of stream 0 (the second text of a multi-view
    example): every salt is offset by k * `SALT_STREAM_STRIDE`.
    """
    offset = stream * SALT_STREAM_STRIDE
    sentences = split_sentences(texts)
    counts = sentences.row_lengths()
    if num_sentences is not None:
        keep = tf.minimum(counts, num_sentences)
    elif sentence_fraction is not None:
        keep = tf.cast(tf.math.ceil(sentence_fraction * tf.cast(counts, tf.float64)), tf.int64)
    else:
        u = uniform(seed, SALT_SENTENCE_COUNT + offset, positions, 1)[:, 0]
        most = counts if max_sentences is None else tf.minimum(counts, max_sentences)
        keep = 1 + tf.cast(tf.floor(u * tf.cast(most, tf.float32)), tf.int64)
    keep = tf.clip_by_value(keep, tf.minimum(counts, 1), counts)
    # Sentences in the order of a random key per (seed, position, sentence index).
    row_of = sentences.value_rowids()
    within = tf.range(tf.size(row_of, out_type=tf.int64)) - tf.gather(
        sentences.row_starts(), row_of)
    keys = keyed_uniform(seed, SALT_SENTENCES + offset,
                         tf.gather(tf.cast(positions, tf.int64), row_of), within)
    order = tf.argsort(tf.cast(row_of, tf.float64) + tf.cast(keys, tf.float64), stable=True)
    shuffled = tf.RaggedTensor.from_row_splits(tf.gather(sentences.flat_values, order),
                                               sentences.row_splits)
    kept = tf.ragged.boolean_mask(
        shuffled, tf.ragged.range(counts) < tf.expand_dims(keep, 1))
    selected = tf.strings.reduce_join(kept, axis=1, separator=" ")
    if not full_report_prob:
        return selected
    full = uniform(seed, SALT_FULL_REPORT + offset, positions, 1)[:, 0] < full_report_prob
    return tf.where(full, texts, selected)


def text_hash(strings: tf.Tensor) -> tf.Tensor:
    """Non-negative int32 hash; the same string always gets the same value."""
    return tf.cast(tf.strings.to_hash_bucket_fast(strings, HASH_BUCKETS), tf.int32)


class TextStage:
    """Rows -> (normalised text [b], tokens int32 [b, L], label prompt used bool [b] or
    None) for one text stream of a batch's examples."""

    def __init__(self, data_config: ml_collections.ConfigDict, tokenizer: Tokenizer,
                 seed: int, train: bool, decoupled=None):
        """`decoupled`: the stage that puts label prompts on its chosen rows (training
        with `data.decoupled`), else None."""
        data_config = config_schema.filled("data", data_config)  # Checks data.text too.
        self.source, self.tokenizer, self.seed = data_config.text, tokenizer, seed
        self.decoupled = decoupled
        self.sampling = None
        if train and self.source == "sentences":
            self.sampling = dict(num_sentences=data_config.num_sentences,
                                 sentence_fraction=data_config.sentence_fraction,
                                 max_sentences=data_config.max_sentences,
                                 full_report_prob=data_config.full_report_prob)

    def __call__(self, example: dict[str, tf.Tensor], rows: dict[str, tf.Tensor],
                 section: str, stream: int = 0
                 ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor | None]:
        """The text of `section` (a `data.text` value) for text stream `stream`."""
        text = select_text(example["findings"], example["impression"], section)
        if self.sampling is not None:
            text = select_sentences(text, rows["position"], self.seed, **self.sampling,
                                    stream=stream)
        if "has_report" in example:
            text = tf.where(tf.cast(example["has_report"], tf.bool), text, "")
        prompted = None
        if self.decoupled is not None:
            text, prompted = self.decoupled.prompt_texts(example, rows, text, stream)
        normalized, tokens = self.tokenizer.tf_normalize_and_encode(text)
        return normalized, tokens, prompted
