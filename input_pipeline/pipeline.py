"""tf.data input pipeline: per-process reading, preprocessing, tokenization, batching.

    builder, tokenizer = prepare(config.data)
    dataset = make_dataset(config.data, builder, tokenizer, "train",
                           global_batch_size=config.global_batch_size, train=True,
                           seed=config.seed)

Each process reads its own slice of the split (`tfds.split_for_jax_process`) and yields
host-local batches of `global_batch_size // process_count` examples, as dicts:

  image           float32 [b, H, W, 1]  resized with aspect ratio kept (zero padding),
                                        scaled to [0, 1], then (x - image_mean) / image_std
  tokens          int32 [b, max_text_len]  BOS + pieces + EOS, 0-padded (tokenizer.py)
  study_id        int32 [b]  non-negative hash of the study id: views of a study match
  text_id         int32 [b]  non-negative hash of the normalised text: equal texts match
  labels          float32 [b, 14]  CheXpert order (findings.py): 1 / 0 / -1; blank -> 0
  labels_present  bool [b, 14]  False where the label is blank (not mentioned)
  mask            bool [b]  False for padding rows
  text            bytes [b]  the normalised text (only when train=False)
  view            bytes [b]  "PA" / "AP" / "LATERAL" (only when train=False)

The text is `data_config.text`: "report" (findings and impression, without the section
headers, joined by a space), "findings" or "impression".

train=True: files and examples shuffled from `seed` (a new, seed-determined order each
epoch), repeated forever, partial batches dropped. train=False: one pass in file order;
padding rows (mask=False, all zeros) complete the last batch, and every process yields
the same number of batches, so multi-host evaluation steps stay in lockstep.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from input_pipeline import synthetic_builder
from input_pipeline.tokenizer import (
    Tokenizer,
    ensure_tokenizer,
    normalize_text,
    tensorflow_on_host,
)

TEXT_SOURCES = ("report", "findings", "impression")
HASH_BUCKETS = 2**31 - 1  # Hashes fit a non-negative int32.

# data.name -> function(data_config) -> prepared TFDS builder.
DATASET_BUILDERS: dict[str, Callable] = {"synthetic_cxr": synthetic_builder.build}


tensorflow_on_host()  # Before any TensorFlow op can claim accelerator memory.


def prepare(data_config: ml_collections.ConfigDict) -> tuple[tfds.core.DatasetBuilder,
                                                              Tokenizer]:
    """Builds the dataset and trains its tokenizer where needed; returns both."""
    build = DATASET_BUILDERS.get(data_config.name)
    if build is None:
        raise ValueError(f"data.name={data_config.name!r} is not a known dataset; "
                         f"available: {', '.join(sorted(DATASET_BUILDERS))}")
    builder = build(data_config)
    return builder, ensure_tokenizer(data_config, builder)


def image_preprocess(encoded_png: tf.Tensor, data_config: ml_collections.ConfigDict
                     ) -> tf.Tensor:
    """PNG bytes (8- or 16-bit grayscale) -> normalised float32 [S, S, 1]."""
    image = tf.io.decode_png(encoded_png, channels=1, dtype=tf.uint16)
    image = tf.image.convert_image_dtype(image, tf.float32)  # [0, 1] for both bit depths.
    size = data_config.image_size
    image = tf.image.resize_with_pad(image, size, size, method="bilinear", antialias=True)
    return (image - data_config.image_mean) / data_config.image_std


def select_text(findings: tf.Tensor, impression: tf.Tensor, text_source: str) -> tf.Tensor:
    """The text a model reads, before normalisation (see TEXT_SOURCES)."""
    if text_source == "report":
        return tf.strings.join([findings, impression], separator=" ")
    if text_source == "findings":
        return findings
    if text_source == "impression":
        return impression
    raise ValueError(f"data.text={text_source!r}; expected one of {TEXT_SOURCES}")


def normalize_texts(texts: tf.Tensor) -> tf.Tensor:
    """`tokenizer.normalize_text` over a string tensor [N] (the Python definition)."""
    texts = tf.convert_to_tensor(texts, dtype=tf.string)
    texts.shape.assert_has_rank(1)

    def normalize(batch: np.ndarray) -> np.ndarray:
        return np.array([normalize_text(t).encode("utf-8") for t in batch.tolist()],
                        dtype=object)

    normalized = tf.numpy_function(normalize, [texts], tf.string, stateful=False,
                                   name="normalize_text")
    normalized.set_shape(texts.shape)
    return normalized


def text_preprocess(texts: tf.Tensor, tokenizer: Tokenizer) -> dict[str, tf.Tensor]:
    """Raw texts [N] -> {"text": normalised [N], "text_id": int32 [N], "tokens": [N, L]}."""
    normalized = normalize_texts(texts)
    return {
        "text": normalized,
        "text_id": text_hash(normalized),
        "tokens": tokenizer.tf_encode(normalized),
    }


def text_hash(strings: tf.Tensor) -> tf.Tensor:
    """Non-negative int32 hash; the same string always gets the same value."""
    return tf.cast(tf.strings.to_hash_bucket_fast(strings, HASH_BUCKETS), tf.int32)


def make_dataset(data_config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder,
                 tokenizer: Tokenizer, split: str, *, global_batch_size: int, train: bool,
                 seed: int, process_index: int | None = None,
                 process_count: int | None = None) -> tf.data.Dataset:
    """Host-local batches of this process's share of `split` (see the module docstring).

    `process_index`/`process_count` default to `jax.process_index()/process_count()`.
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
    if data_config.text not in TEXT_SOURCES:
        raise ValueError(f"data.text={data_config.text!r}; expected one of {TEXT_SOURCES}")
    local_batch_size = global_batch_size // process_count
    splits = [tfds.split_for_jax_process(split, process_index=i, process_count=process_count)
              for i in range(process_count)]

    options = tf.data.Options()
    options.deterministic = True
    options.autotune.enabled = True
    dataset = builder.as_dataset(
        split=splits[process_index],
        shuffle_files=train,
        read_config=tfds.ReadConfig(shuffle_seed=seed, options=options),
        decoders={"image": tfds.decode.SkipDecoding()},  # Decoded in image_preprocess.
    )
    if train:
        dataset = dataset.shuffle(data_config.shuffle_buffer, seed=seed,
                                  reshuffle_each_iteration=True).repeat()
    dataset = dataset.map(functools.partial(_example_features, data_config=data_config,
                                            train=train),
                          num_parallel_calls=tf.data.AUTOTUNE)
    if not train:
        counts = [builder.info.splits[s].num_examples for s in splits]
        num_batches = -(-max(counts) // local_batch_size)
        padding = num_batches * local_batch_size - counts[process_index]
        if padding:
            rows = tf.nest.map_structure(lambda spec: tf.zeros(spec.shape, spec.dtype),
                                         dataset.element_spec)
            dataset = dataset.concatenate(tf.data.Dataset.from_tensors(rows).repeat(padding))
    dataset = dataset.batch(local_batch_size, drop_remainder=True,
                            num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.map(functools.partial(_batch_features, tokenizer=tokenizer, train=train),
                          num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE).with_options(options)


def _example_features(example, *, data_config, train: bool) -> dict[str, tf.Tensor]:
    labels = example["labels"]
    present = tf.logical_not(tf.math.is_nan(labels))
    features = {
        "image": image_preprocess(example["image"], data_config),
        "raw_text": select_text(example["findings"], example["impression"], data_config.text),
        "study_id": text_hash(example["study_id"]),
        "labels": tf.where(present, labels, tf.zeros_like(labels)),
        "labels_present": present,
        "mask": tf.constant(True),
    }
    if not train:
        features["view"] = example["view"]
    return features


def _batch_features(batch, *, tokenizer: Tokenizer, train: bool) -> dict[str, tf.Tensor]:
    batch = dict(batch)
    text = text_preprocess(batch.pop("raw_text"), tokenizer)
    mask = batch["mask"]
    # Padding rows are all zeros, tokens and ids included.
    batch["tokens"] = tf.where(mask[:, None], text["tokens"], tf.zeros_like(text["tokens"]))
    batch["text_id"] = tf.where(mask, text["text_id"], tf.zeros_like(text["text_id"]))
    if not train:
        batch["text"] = text["text"]
    return batch
