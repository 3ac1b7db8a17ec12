"""The first stage: which records make up each batch, read by index from the shards.

With N records and global batch B, global batch k holds the positions [k*B, (k+1)*B) of
a stream, and process p of P takes its contiguous b = B / P of them,
[k*B + p*b, k*B + (p+1)*b). Training: the stream is the epochs one after another,
position t being record `permutation(t mod N)` of epoch t // N (numpy, seeded by (seed,
epoch)), so a batch is a function of (seed, step) only. Evaluation: one pass in record
order; positions past the end are padding rows (`valid` False).
"""

from __future__ import annotations

import os
import threading

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

SALT_ORDER = 1  # The epoch permutations' stream (augment.py and the stages: the others).
# What every record must hold; `has_report` is read where present.
REQUIRED_FEATURES = ("image", "view", "study_id", "findings", "impression", "labels")


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


class StepRecords:
    """Global batch `step` -> this process's rows: `position` int64 [b] in the stream,
    `index` int64 [b] (the record read), `valid` bool [b] (False: a padding row) and
    `serialized` string [b] (the record)."""

    def __init__(self, source: RecordReader, seed: int, train: bool, global_batch_size: int,
                 process_index: int, process_count: int):
        self.source, self.train, self.global_batch_size = source, train, global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.first = process_index * self.local_batch_size  # Within the global batch.
        self.order = EpochOrder(len(source), seed)

    def steps(self, start_step: int) -> tf.data.Dataset:
        """The global batch numbers this process reads, from `start_step` on."""
        if self.train:
            return tf.data.Dataset.range(start_step,
                                         np.iinfo(np.int64).max // self.global_batch_size)
        return tf.data.Dataset.range(start_step, -(-len(self.source) // self.global_batch_size))

    def __call__(self, step: tf.Tensor) -> dict[str, tf.Tensor]:
        b = self.local_batch_size
        positions = step * self.global_batch_size + self.first + tf.range(b, dtype=tf.int64)
        if self.train:
            valid = tf.ones([b], tf.bool)
            index = tf.numpy_function(self.order.records_at, [positions], tf.int64,
                                      stateful=False, name="example_order")
        else:
            valid = positions < len(self.source)
            index = tf.where(valid, positions, 0)  # Padding rows read record 0, then zeroed.
        index.set_shape([b])
        serialized = tf.numpy_function(self.source.read, [index], tf.string, stateful=False,
                                       name="read_records")
        serialized.set_shape([b])
        return {"position": positions, "index": index, "valid": valid, "serialized": serialized}


def record_parser(builder: tfds.core.DatasetBuilder):
    """serialized tf.train.Example [N] -> dict of batched features, the image left
    encoded (PNG bytes). Raises when a required feature is missing."""
    features = builder.info.features
    missing = [k for k in REQUIRED_FEATURES if k not in features]
    if missing:
        raise ValueError(f"{builder.name} records lack the features {missing}")
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
