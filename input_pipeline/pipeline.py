"""tf.data input pipeline: records read by index, preprocessing, tokenization, batching.

    builder, tokenizer = prepare(config.data)
    dataset = make_dataset(config.data, builder, tokenizer, "train",
                           global_batch_size=config.global_batch_size, train=True,
                           seed=config.seed, start_step=step)

Order. Records are read by index (ArrayRecord, `builder.as_data_source`). With N records
and global batch B, global batch k holds the positions [k*B, (k+1)*B) of a stream, and
process p of P takes its contiguous `b = B / P` of them, [k*B + p*b, k*B + (p+1)*b).
train=True: the stream is the epochs one after another, position t being record
`permutation(t mod N)` of epoch `t // N` (numpy, seeded by (seed, epoch)), so the
batches are a function of (seed, step) only: `start_step=k` starts at batch k at once,
exactly where an uninterrupted run would be, and P processes read exactly the rows one
process would. train=False: one pass in record order; positions past the end are padding
rows, and every process yields the same number of batches (multi-host evaluation steps
stay in lockstep). Augmentation and sentence choice draw from (seed, position) too.

Batches are host-local dicts of `b` rows:

  image           float32 [b, H, W, 1]  resized with aspect ratio kept (zero padding),
                                        scaled to [0, 1], augmented (train=True,
                                        `data.augment`, augment.py; with rotation, one
                                        warp from the source), then
                                        (x - image_mean) / image_std
  tokens          int32 [b, max_text_len]  BOS + pieces + EOS, 0-padded (tokenizer.py)
  study_id        int32 [b]  non-negative hash of the study id: views of a study match
  text_id         int32 [b]  non-negative hash of the normalised text: equal texts match
  labels          float32 [b, 14]  CheXpert order (findings.py): 1 / 0 / -1; blank -> 0
  labels_present  bool [b, 14]  False where the label is blank (not mentioned)
  mask            bool [b]  False for padding rows and skipped examples
  num_skipped     int32 [b]  1 where a bad example was skipped (its row is masked out);
                             the batch's sum is its count of skipped examples
  text            bytes [b]  the normalised text (only when train=False)
  view            bytes [b]  "PA" / "AP" / "LATERAL" (only when train=False)
  image2, tokens2, text_id2  a second view and a second text of the example (only when
                  train=True and `data.multiview`; see multiview.py)
  label_prompt    bool [b]  the text is the record's labels written as text, an
                  image-label example (only when train=True and `data.decoupled`; see
                  label_prompts.py)
  image_mask      bool [b]  False for a text-label example (a report without its image;
                  the image is still read and decoded, so shapes stay static, and the
                  loss leaves it out); True for every other example row
  text_mask       bool [b]  True for every example row (no example lacks its text);
                  both only when train=True and `data.decoupled` (label_prompts.py)

Rows with mask=False are all zeros (texts empty).

Text (`data.text`): "report" or "both" (findings and impression, joined by a space),
"findings", "impression", or "sentences" (train=True: a random subset of the report's
sentences in random order: `data.num_sentences` of them, else `data.sentence_fraction`
of them rounded up, else a number drawn uniformly from 1..min(all, `data.max_sentences`);
with probability `data.full_report_prob` the whole report instead; train=False reads the
report). When the chosen section is empty, the other one is used (e.g. impression-only
reports under "findings").

Bad data. An example whose image is not an intact PNG (signature, chunk CRCs, IHDR,
IDAT, IEND), or, in training, whose text is empty (also `has_report` False), is skipped:
its row keeps its place with mask=False, so the order of every other example is
unchanged, and `num_skipped` counts it. Once a process has read `min(1000, its share of
the split)` examples, more than `data.max_bad_fraction` (default 0.05) of them skipped
stops the iteration with an error naming the counts.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from collections.abc import Callable

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from input_pipeline import (
    chexpert,
    csv_manifest,
    label_prompts,
    mimic_cxr,
    synthetic_builder,
)
from input_pipeline import multiview as multiview_lib
from input_pipeline.augment import (
    SALT_STREAM_STRIDE,
    AugmentConfig,
    augment_images,
    keyed_uniform,
    photometric,
    source_warps,
    uniform,
    warp_source,
)
from input_pipeline.findings import NUM_FINDINGS
from input_pipeline.tokenizer import Tokenizer, ensure_tokenizer, tensorflow_on_host

TEXT_SOURCES = ("report", "both", "findings", "impression", "sentences")
HASH_BUCKETS = 2**31 - 1  # Hashes fit a non-negative int32.
DEFAULT_MAX_BAD_FRACTION = 0.05
BAD_FRACTION_MIN_EXAMPLES = 1000
# Salts of the random streams drawn from the seed (augment.py has its own).
SALT_ORDER = 1
SALT_SENTENCES = 2
SALT_SENTENCE_COUNT = 3
SALT_FULL_REPORT = 4
REQUIRED_FEATURES = ("image", "view", "study_id", "findings", "impression", "labels")
_SENTENCE_END = r"([.!?])\s+"
_SENTENCE_BREAK = "\x1e"  # ASCII record separator: never in a report.
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# data.name -> function(data_config) -> prepared TFDS builder (ArrayRecord records).
DATASET_BUILDERS: dict[str, Callable] = {
    "synthetic_cxr": synthetic_builder.build,
    "csv_manifest": csv_manifest.build,
    "mimic_cxr": mimic_cxr.build,
    "chexpert": chexpert.build,  # Label-only: training skips it until labels become text.
}


tensorflow_on_host()  # Before any TensorFlow op can claim accelerator memory.


def prepare(data_config: ml_collections.ConfigDict) -> tuple[tfds.core.DatasetBuilder,
                                                              Tokenizer]:
    """Builds the dataset and trains its tokenizer where needed; returns both."""
    builder = build_dataset(data_config)
    return builder, ensure_tokenizer(data_config, builder)


def build_dataset(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The prepared TFDS builder of `data.name` (built first where absent)."""
    build = DATASET_BUILDERS.get(data_config.name)
    if build is None:
        raise ValueError(f"data.name={data_config.name!r} is not a known dataset; "
                         f"available: {', '.join(sorted(DATASET_BUILDERS))}")
    return build(data_config)


def decode_png(encoded_png: tf.Tensor) -> tf.Tensor:
    """PNG bytes (8- or 16-bit grayscale) -> float32 [h, w, 1] in [0, 1]."""
    image = tf.io.decode_png(encoded_png, channels=1, dtype=tf.uint16)
    return tf.image.convert_image_dtype(image, tf.float32)  # [0, 1] for both bit depths.


def png_size(encoded_png: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """PNG bytes [N] -> (height, width) int32 [N] from the IHDR chunk, without decoding.
    Bytes missing from a short string read as 0 (`png_is_intact` rejects such strings)."""
    header = tf.strings.substr(tf.strings.join([encoded_png, b"\0" * 24]), 16, 8)
    header = tf.cast(tf.io.decode_raw(header, tf.uint8), tf.int32)  # Big-endian.
    width = tf.reduce_sum(header[:, :4] * [1 << 24, 1 << 16, 1 << 8, 1], axis=1)
    height = tf.reduce_sum(header[:, 4:] * [1 << 24, 1 << 16, 1 << 8, 1], axis=1)
    return height, width


def decode_and_resize(encoded_png: tf.Tensor, size: int) -> tf.Tensor:
    """PNG bytes (8- or 16-bit grayscale) -> float32 [size, size, 1] in [0, 1], aspect
    ratio kept (zero padding)."""
    return tf.image.resize_with_pad(decode_png(encoded_png), size, size, method="bilinear",
                                    antialias=True)


def image_preprocess(encoded_png: tf.Tensor, data_config: ml_collections.ConfigDict
                     ) -> tf.Tensor:
    """PNG bytes -> normalised float32 [S, S, 1] (the evaluation preprocessing)."""
    image = decode_and_resize(encoded_png, data_config.image_size)
    return (image - data_config.image_mean) / data_config.image_std


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
    """string [N] -> ragged [N, None]: sentences end at . ! or ? followed by whitespace."""
    marked = tf.strings.regex_replace(texts, _SENTENCE_END, r"\1" + _SENTENCE_BREAK)
    sentences = tf.strings.strip(tf.strings.split(marked, sep=_SENTENCE_BREAK))
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


def text_preprocess(texts: tf.Tensor, tokenizer: Tokenizer) -> dict[str, tf.Tensor]:
    """Raw texts [N] -> {"text": normalised [N], "text_id": int32 [N], "tokens": [N, L]}."""
    normalized, tokens = tokenizer.tf_normalize_and_encode(texts)
    return {"text": normalized, "text_id": text_hash(normalized), "tokens": tokens}


def png_is_intact(data: bytes) -> bool:
    """True when `data` is a structurally complete PNG: signature, IHDR first with a
    non-empty size, every chunk's CRC, at least one IDAT, IEND last."""
    if not data.startswith(_PNG_SIGNATURE):
        return False
    offset, end, first, has_idat = len(_PNG_SIGNATURE), len(data), True, False
    while offset + 12 <= end:
        length, kind = struct.unpack_from(">I4s", data, offset)
        stop = offset + 12 + length
        if stop > end:
            return False
        body = data[offset + 8: offset + 8 + length]
        (crc,) = struct.unpack_from(">I", data, offset + 8 + length)
        if zlib.crc32(body, zlib.crc32(kind)) != crc:
            return False
        if first:
            if kind != b"IHDR" or length != 13:
                return False
            width, height = struct.unpack_from(">II", body)
            if not width or not height:
                return False
            first = False
        has_idat |= kind == b"IDAT"
        if kind == b"IEND":
            return has_idat and stop == end
        offset = stop
    return False


def record_source(builder: tfds.core.DatasetBuilder, split: str):
    """The serialized records of `split`, by index (a TFDS ArrayRecord data source)."""
    try:
        return builder.as_data_source(
            split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    except NotImplementedError:
        raise ValueError(
            f"{builder.name} in {builder.data_dir} is stored as {builder.info.file_format}, "
            "but the pipeline reads records by index: prepare it with "
            "download_and_prepare(file_format='array_record') (in a new data_dir, or "
            "after deleting these records)") from None


class RecordReader:
    """The serialized records of a split by index, read in batches straight from the
    ArrayRecord shards (one reader per shard, opened on first use)."""

    def __init__(self, builder: tfds.core.DatasetBuilder, split: str):
        record_source(builder, split)  # Refuses other formats with a remedy.
        from array_record.python import array_record_module

        self._open = array_record_module.ArrayRecordReader
        shards = builder.info.splits[split].file_instructions
        self._files = [os.fspath(shard.filename) for shard in shards]
        self._skips = np.array([shard.skip for shard in shards], np.int64)
        self._starts = np.cumsum([0] + [shard.take for shard in shards])
        self._readers: list = [None] * len(shards)
        self._locks = [threading.Lock() for _ in shards]

    def __len__(self) -> int:
        return int(self._starts[-1])

    def read(self, indices: np.ndarray) -> np.ndarray:
        """object [N] of bytes: records `indices` of the split."""
        indices = np.asarray(indices, np.int64)
        shard_of = np.searchsorted(self._starts, indices, side="right") - 1
        out = np.empty(len(indices), dtype=object)
        for shard in np.unique(shard_of):
            rows = np.flatnonzero(shard_of == shard)
            positions = indices[rows] - self._starts[shard] + self._skips[shard]
            with self._locks[shard]:  # One read at a time per reader.
                if self._readers[shard] is None:
                    self._readers[shard] = self._open(self._files[shard],
                                                      "readahead_buffer_size:0")
                out[rows] = self._readers[shard].read(positions.tolist())
        return out


class EpochOrder:
    """Position t of the training stream -> record `permutation(seed, t // N)[t % N]`.

    The permutation of an epoch is numpy's (PCG64 seeded by (seed, salt, epoch)); the
    last few used are cached, so reading is O(1) per example after O(N) once per epoch.
    """

    def __init__(self, num_records: int, seed: int, cached_epochs: int = 3):
        self.num_records, self.seed, self.cached_epochs = num_records, seed, cached_epochs
        self._cache: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def permutation(self, epoch: int) -> np.ndarray:
        with self._lock:
            permutation = self._cache.pop(epoch, None)
            if permutation is None:
                rng = np.random.default_rng([self.seed, SALT_ORDER, epoch])
                permutation = rng.permutation(self.num_records)
            self._cache[epoch] = permutation  # Most recently used last.
            while len(self._cache) > self.cached_epochs:
                self._cache.pop(next(iter(self._cache)))
            return permutation

    def records_at(self, positions: np.ndarray) -> np.ndarray:
        epochs, within = np.divmod(positions, self.num_records)
        out = np.empty_like(positions)
        for epoch in np.unique(epochs):
            rows = epochs == epoch
            out[rows] = self.permutation(int(epoch))[within[rows]]
        return out


def make_dataset(data_config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder,
                 tokenizer: Tokenizer, split: str, *, global_batch_size: int, train: bool,
                 seed: int, process_index: int | None = None,
                 process_count: int | None = None, start_step: int = 0) -> tf.data.Dataset:
    """Host-local batches of this process's share of `split` (see the module docstring).

    `start_step`: the first batch is global batch `start_step` (training resumes there;
    in evaluation, batches before it are left out). `process_index`/`process_count`
    default to `jax.process_index()/process_count()`.
    """
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside [0, {process_count})")
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} is not a positive multiple "
                         f"of the {process_count} processes")
    if start_step < 0:
        raise ValueError(f"start_step={start_step} is negative")
    text_source = data_config.text
    if text_source not in TEXT_SOURCES:
        raise ValueError(f"data.text={text_source!r}; expected one of {TEXT_SOURCES}")
    augment = AugmentConfig.from_config(data_config.get("augment"))
    # Training with rotation resamples each decoded image once, straight from the source
    # (augment.source_warps), instead of resizing it, then warping that (half the work:
    # docs/benchmarks.md). A crop or flip alone keeps resize + crop_and_resize, the path
    # the Quickstart's figures were measured with: one-seed Quickstarts with the one-warp
    # path scored 0.915 and 0.899 validation zero-shot AUC against its 0.926.
    warp = train and augment.rotation_degrees > 0
    multiview = multiview_lib.MultiviewData.from_config(data_config, augment) if train else None
    decoupled = label_prompts.DecoupledData.from_config(data_config) if train else None
    max_bad_fraction = data_config.get("max_bad_fraction", DEFAULT_MAX_BAD_FRACTION)
    missing = [k for k in REQUIRED_FEATURES if k not in builder.info.features]
    if missing:
        raise ValueError(f"{builder.name} records lack the features {missing}")

    source = RecordReader(builder, split)
    num_records = len(source)
    if num_records == 0:
        raise ValueError(f"split {split!r} of {builder.name} is empty")
    local_batch_size = global_batch_size // process_count
    first = process_index * local_batch_size
    order = EpochOrder(num_records, seed)
    if multiview is not None:
        study_index = multiview_lib.StudyIndex(multiview_lib.read_study_ids(source))

    def rows_of_step(step):
        positions = step * global_batch_size + first + tf.range(local_batch_size,
                                                                dtype=tf.int64)
        if train:
            valid = tf.ones([local_batch_size], tf.bool)
            index = tf.numpy_function(order.records_at, [positions], tf.int64, stateful=False,
                                      name="example_order")
        else:
            valid = positions < num_records
            index = tf.where(valid, positions, 0)  # Padding rows read record 0, then zeroed.
        serialized = tf.numpy_function(source.read, [index], tf.string, stateful=False,
                                       name="read_records")
        serialized.set_shape([local_batch_size])
        rows = {"position": positions, "serialized": serialized, "valid": valid}
        if decoupled is not None:
            # One draw ranks the rows of the global batch: the k lowest are the prompt
            # rows, the next m the text-only rows (disjoint, exactly k and m chosen).
            batch_positions = step * global_batch_size + tf.range(global_batch_size,
                                                                  dtype=tf.int64)
            u = uniform(seed, label_prompts.SALT_PROMPT_ROWS, batch_positions, 1)[:, 0]
            rank = tf.argsort(tf.argsort(u, stable=True), stable=True)
            rank = rank[first:first + local_batch_size]
            prompt_rows = decoupled.image_only_rows(global_batch_size)
            text_only_rows = decoupled.text_only_rows(global_batch_size)
            rows["prompt_row"] = rank < prompt_rows
            rows["text_only_row"] = (rank >= prompt_rows) & (rank < prompt_rows +
                                                             text_only_rows)
        if multiview is not None:
            u = uniform(seed, multiview_lib.SALT_OTHER_VIEW, positions, 1)[:, 0]
            other = tf.numpy_function(study_index.other_views, [index, u], tf.int64,
                                      stateful=False, name="other_view")
            other.set_shape([local_batch_size])
            rows["has_other_view"] = other >= 0
            rows["serialized_other_view"] = tf.numpy_function(
                lambda o: multiview_lib.read_other_views(source, o), [other], tf.string,
                stateful=False, name="read_other_views")
        return rows

    if train:
        steps = tf.data.Dataset.range(start_step, np.iinfo(np.int64).max // global_batch_size)
    else:
        steps = tf.data.Dataset.range(start_step, -(-num_records // global_batch_size))
    features = builder.info.features
    parse = _batch_parser(features)
    image_only = {"image": tf.io.FixedLenFeature([], tf.string, default_value="")}

    def training_text(example, rows, section, stream):
        """(text, is the label prompt or None): the text of `section` (a `data.text`
        value), sentence-sampled in training; the label prompt where `data.decoupled`
        asks for one."""
        positions = rows["position"]
        text = select_text(example["findings"], example["impression"], section)
        if text_source == "sentences" and train:
            text = select_sentences(text, positions, seed,
                                    data_config.get("num_sentences"),
                                    data_config.get("sentence_fraction"),
                                    data_config.get("max_sentences"),
                                    data_config.get("full_report_prob", 0.0), stream=stream)
        if "has_report" in example:
            text = tf.where(tf.cast(example["has_report"], tf.bool), text, "")
        if decoupled is None:
            return text, None
        prompt = tf.numpy_function(
            lambda labels, p: label_prompts.prompts(labels, p, seed, stream),
            [example["labels"], positions], tf.string, stateful=False, name="label_prompts")
        prompt.set_shape([local_batch_size])
        wanted = rows["prompt_row"]
        if decoupled.label_only_prompts and "has_report" in example:
            wanted |= ~tf.cast(example["has_report"], tf.bool)
        use = wanted & (tf.strings.length(prompt) > 0)
        return tf.where(use, prompt, text), use

    def png_check(images):
        intact = tf.numpy_function(
            lambda images: np.array([png_is_intact(x) for x in images.tolist()], dtype=bool),
            [images], tf.bool, stateful=False, name="check_png")
        intact.set_shape([local_batch_size])
        return intact

    def text_and_checks(rows):
        example = parse(rows.pop("serialized"))
        sections = (text_source,)
        if multiview is not None:
            sections = {"resample": (text_source, text_source),
                        "findings_impression": ("findings", "impression")}[multiview.texts]
        text, prompted = training_text(example, rows, sections[0], stream=0)
        normalized, tokens = tokenizer.tf_normalize_and_encode(text)
        intact = png_check(example["image"])
        good = intact & (tf.strings.length(normalized) > 0) if train else intact
        second = {}
        if multiview is not None:
            text2, _ = training_text(example, rows, sections[1],
                                     stream=multiview_lib.SECOND_STREAM)
            second["text2"], second["tokens2"] = tokenizer.tf_normalize_and_encode(text2)
            other = tf.io.parse_example(rows.pop("serialized_other_view"), image_only)
            second["encoded_image2"] = tf.where(rows.pop("has_other_view"), other["image"],
                                                example["image"])
            good &= png_check(second["encoded_image2"]) & (
                tf.strings.length(second["text2"]) > 0)
        valid = rows["valid"]
        labels = tf.cast(example["labels"], tf.float32)
        labels.set_shape([local_batch_size, NUM_FINDINGS])
        present = tf.logical_not(tf.math.is_nan(labels))
        out = {
            "position": rows["position"],
            "encoded_image": example["image"],
            "decode": valid & good,
            "num_skipped": tf.cast(valid & ~good, tf.int32),
            "tokens": tokens,
            "text": normalized,
            "study_id": text_hash(example["study_id"]),
            "labels": tf.where(present, labels, tf.zeros_like(labels)),
            "labels_present": present,
            **second,
        }
        if warp:  # Each image's geometric augmentation, batched (decode applies it).
            for stream, name in enumerate(("image", "image2")):
                if f"encoded_{name}" in out:
                    out[f"warp_{name}"] = source_warps(
                        rows["position"], seed, augment, data_config.image_size,
                        *png_size(out[f"encoded_{name}"]), stream=stream)
        if prompted is not None:
            # A chosen text-only row keeps its image where the loss could not use the
            # row without it: no report (its text is then the prompt) or a label row
            # that is all zero (no soft target; label_prompts.py).
            text_only = rows["text_only_row"] & tf.reduce_any(out["labels"] != 0, axis=1)
            if "has_report" in example:
                text_only &= tf.cast(example["has_report"], tf.bool)
            out.update(label_prompt=prompted, image_mask=~text_only,
                       text_mask=tf.ones_like(text_only))
        if not train:
            out["view"] = example["view"]
        return out

    size = data_config.image_size

    def decode(row):
        row = dict(row)
        for name in ("image", "image2"):
            if f"encoded_{name}" not in row:
                continue
            encoded = row.pop(f"encoded_{name}")
            if warp:
                params = row.pop(f"warp_{name}")

                def load(encoded=encoded, params=params):
                    return warp_source(decode_png(encoded), params, size)
            else:
                def load(encoded=encoded):
                    return decode_and_resize(encoded, size)
            row[name] = tf.cond(row["decode"], load,
                                lambda: tf.zeros([size, size, 1], tf.float32))
        return row

    def finish(batch):
        batch = dict(batch)
        positions, mask = batch.pop("position"), batch.pop("decode")
        out = {}
        for stream, name in enumerate(("image", "image2")):
            if name not in batch:
                continue
            images = batch[name]
            if warp:  # The geometric part is done (decode).
                images = photometric(images, positions, seed, augment, stream=stream)
            elif train:
                images = augment_images(images, positions, seed, augment, stream=stream)
            images = (images - data_config.image_mean) / data_config.image_std
            out[name] = tf.where(mask[:, None, None, None], images, tf.zeros_like(images))
        out.update(mask=mask, num_skipped=batch["num_skipped"])
        for key in ("tokens", "tokens2", "study_id", "labels", "labels_present",
                    "label_prompt", "image_mask", "text_mask"):
            if key not in batch:
                continue
            value = batch[key]
            out[key] = tf.where(tf.reshape(mask, [-1] + [1] * (value.shape.rank - 1)), value,
                                tf.zeros_like(value))
        out["text_id"] = tf.where(mask, text_hash(batch["text"]), 0)
        if "text2" in batch:
            out["text_id2"] = tf.where(mask, text_hash(batch["text2"]), 0)
        if not train:
            out["text"] = tf.where(mask, batch["text"], "")
            out["view"] = tf.where(mask, batch["view"], "")
        return out

    options = tf.data.Options()
    options.deterministic = True
    options.autotune.enabled = True
    parallel = tf.data.AUTOTUNE
    dataset = (steps.map(rows_of_step, num_parallel_calls=parallel)
               .map(text_and_checks, num_parallel_calls=parallel)
               .unbatch()
               .map(decode, num_parallel_calls=parallel)
               .batch(local_batch_size, drop_remainder=True)
               .map(finish, num_parallel_calls=parallel))
    share = -(-num_records // process_count)
    dataset = _stop_above_bad_fraction(dataset, max_bad_fraction,
                                       min(BAD_FRACTION_MIN_EXAMPLES, share))
    return dataset.prefetch(tf.data.AUTOTUNE).with_options(options)


def _batch_parser(features: tfds.features.FeaturesDict):
    """serialized tf.train.Example [N] -> dict of batched features, the image left
    encoded (PNG bytes)."""
    wanted = [k for k in (*REQUIRED_FEATURES, "has_report") if k in features]
    infos = {k: features[k].get_serialized_info() for k in wanted}
    specs = {}
    for key, info in infos.items():
        if any(d is None for d in info.shape):
            raise ValueError(f"feature {key!r} has the variable shape {info.shape}; the "
                             "pipeline reads fixed-shape features only")
        if info.tf_dtype == tf.string:
            dtype = tf.string
        elif info.tf_dtype.is_floating:
            dtype = tf.float32
        else:
            dtype = tf.int64
        specs[key] = tf.io.FixedLenFeature(info.shape, dtype)

    def parse(serialized):
        example = tf.io.parse_example(serialized, specs)
        out = {"image": example.pop("image")}
        for key, value in example.items():
            value = tf.cast(value, infos[key].tf_dtype)
            out[key] = features[key].decode_batch_example(value)
        return out

    return parse


def _stop_above_bad_fraction(dataset: tf.data.Dataset, max_bad_fraction: float,
                             min_examples: int) -> tf.data.Dataset:
    """Raises (on iteration) once more than `max_bad_fraction` of the examples read so
    far, at least `min_examples` of them, were skipped."""
    zero = tf.constant(0, tf.int64)

    def check(state, batch):
        read = state[0] + tf.reduce_sum(tf.cast(batch["mask"], tf.int64)) + tf.reduce_sum(
            tf.cast(batch["num_skipped"], tf.int64))
        skipped = state[1] + tf.reduce_sum(tf.cast(batch["num_skipped"], tf.int64))
        too_many = (read >= min_examples) & (
            tf.cast(skipped, tf.float64) > max_bad_fraction * tf.cast(read, tf.float64))
        message = tf.strings.format(
            "{} of the {} examples read by this process were skipped (image not an intact "
            "PNG, or empty text), more than data.max_bad_fraction={}; fix the records or "
            "raise data.max_bad_fraction", (skipped, read, max_bad_fraction))
        with tf.control_dependencies([tf.debugging.Assert(~too_many, [message])]):
            return (tf.identity(read), tf.identity(skipped)), batch

    return dataset.scan((zero, zero), check)
