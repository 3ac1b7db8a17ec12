"""The tf.data input pipeline: records read by index, preprocessing, tokenization, batching.

    builder, tokenizer = prepare(config.data)
    dataset = make_dataset(config.data, builder, tokenizer, "train",
                           global_batch_size=config.global_batch_size, train=True,
                           seed=config.seed, start_step=step)

`make_dataset` composes the stages of `input_pipeline/stages/` (its docstring lists them):
each global batch's records (source.py) -> decoupled rows and other views where
configured (decoupled.py, views.py) -> texts (text.py) -> images (pixels.py) -> the batch
(batch.py), whose fields `jaxmedclip/batch_schema.py` lists.

Order. Global batch k holds the positions [k*B, (k+1)*B) of a stream and each process
reads its contiguous share (stages/source.py). train=True: the stream is the epochs one
after another, each a permutation seeded by (seed, epoch), so the batches are a function
of (seed, step) only: `start_step=k` starts at batch k at once, exactly where an
uninterrupted run would be, and P processes read exactly the rows one process would.
train=False: one pass in record order; positions past the end are padding rows, and
every process yields the same number of batches (multi-host evaluation steps stay in
lockstep). Augmentation, sentence, view and prompt choices draw from (seed, position) too.

Bad examples (an image that is not an intact PNG; in training, an empty text) keep their
row, masked out and counted in `num_skipped`; more than `data.max_bad_fraction` of them
stops the iteration (stages/batch.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ml_collections
import tensorflow as tf
import tensorflow_datasets as tfds

from input_pipeline import chexpert, csv_manifest, mimic_cxr, synthetic_builder
from input_pipeline.findings import NUM_FINDINGS
from input_pipeline.label_prompts import DecoupledData
from input_pipeline.stages.batch import (
    BAD_FRACTION_MIN_EXAMPLES,
    BatchStage,
    stop_above_bad_fraction,
)
from input_pipeline.stages.decoupled import DecoupledRows
from input_pipeline.stages.pixels import IMAGE_NAMES, PixelStage, image_preprocess
from input_pipeline.stages.source import RecordReader, StepRecords, record_parser
from input_pipeline.stages.text import TextStage, text_hash
from input_pipeline.stages.views import SECOND_STREAM, MultiviewData, OtherViews
from input_pipeline.tokenizer import Tokenizer, ensure_tokenizer, tensorflow_on_host
from jaxmedclip import config_schema
from jaxmedclip.batch_schema import batch_fields

__all__ = ["DATASET_BUILDERS", "build_dataset", "image_preprocess", "make_dataset", "prepare"]

# data.name -> function(data_config) -> prepared TFDS builder (ArrayRecord records).
DATASET_BUILDERS: dict[str, Callable] = {
    "synthetic_cxr": synthetic_builder.build,
    "csv_manifest": csv_manifest.build,
    "mimic_cxr": mimic_cxr.build,
    "chexpert": chexpert.build,  # Label-only: training skips it until labels become text.
}


tensorflow_on_host()  # Before any TensorFlow op can claim accelerator memory.


def complete_data(data_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`data` checked, every declared field filled (`config_schema`; idempotent)."""
    return config_schema.filled("data", data_config)


def prepare(data_config: ml_collections.ConfigDict) -> tuple[tfds.core.DatasetBuilder,
                                                              Tokenizer]:
    """Builds the dataset and trains its tokenizer where needed; returns both."""
    data_config = complete_data(data_config)
    builder = build_dataset(data_config)
    return builder, ensure_tokenizer(data_config, builder)


def build_dataset(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The prepared TFDS builder of `data.name` (built first where absent)."""
    data_config = complete_data(data_config)
    build = DATASET_BUILDERS.get(data_config.name)
    if build is None:
        raise ValueError(f"data.name={data_config.name!r} is not a known dataset; "
                         f"available: {', '.join(sorted(DATASET_BUILDERS))}")
    return build(data_config)


def make_dataset(data_config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder,
                 tokenizer: Tokenizer, split: str, *, global_batch_size: int, train: bool,
                 seed: int, process_index: int | None = None,
                 process_count: int | None = None, start_step: int = 0) -> tf.data.Dataset:
    """Host-local batches of this process's share of `split` (see the module docstring):
    `global_batch_size / process_count` rows each, fields as `batch_schema.batch_fields`.

    `start_step`: the first batch is global batch `start_step` (training resumes there;
    in evaluation, batches before it are left out). `process_index`/`process_count`
    default to `jax.process_index()/process_count()`.
    """
    data_config = complete_data(data_config)
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
    stages = _Stages.create(data_config, builder, tokenizer, split, seed=seed, train=train,
                            global_batch_size=global_batch_size, process_index=process_index,
                            process_count=process_count)
    parallel = tf.data.AUTOTUNE
    dataset = (stages.records.steps(start_step)
               .map(stages.read, num_parallel_calls=parallel)
               .map(stages.examples, num_parallel_calls=parallel)
               .unbatch()
               .map(stages.decode, num_parallel_calls=parallel)
               .batch(stages.records.local_batch_size, drop_remainder=True)
               .map(stages.assemble, num_parallel_calls=parallel))
    share = -(-len(stages.records.source) // process_count)
    dataset = stop_above_bad_fraction(
        dataset, data_config.max_bad_fraction,
        min(BAD_FRACTION_MIN_EXAMPLES, share))
    options = tf.data.Options()
    options.deterministic = True
    options.autotune.enabled = True
    return dataset.prefetch(tf.data.AUTOTUNE).with_options(options)


@dataclasses.dataclass(frozen=True)
class _Stages:
    """The stages of one dataset, run by three maps: `read` (a step's records, batched),
    `examples` (parse, texts, checks; batched) and `decode` (per image); then `assemble`
    (the batch)."""

    records: StepRecords
    parse: Callable
    texts: TextStage
    text_sections: tuple[str, ...]  # The `data.text` value of each text stream.
    pixels: PixelStage
    other_views: OtherViews | None
    decoupled_rows: DecoupledRows | None
    assemble: BatchStage
    train: bool

    @classmethod
    def create(cls, data_config, builder, tokenizer, split, *, seed, train, global_batch_size,
               process_index, process_count) -> _Stages:
        pixels = PixelStage(data_config, seed, train)
        multiview = MultiviewData.from_config(data_config, pixels.augment) if train else None
        decoupled = DecoupledData.from_config(data_config) if train else None
        parse = record_parser(builder)
        reader = RecordReader(builder, split)
        if len(reader) == 0:
            raise ValueError(f"split {split!r} of {builder.name} is empty")
        records = StepRecords(reader, seed, train, global_batch_size, process_index,
                              process_count)
        decoupled_rows = None if decoupled is None else DecoupledRows(
            decoupled, seed, global_batch_size, records.first, records.local_batch_size)
        fields = batch_fields(data_config, records.local_batch_size, train=train)
        return cls(
            records=records, parse=parse,
            texts=TextStage(data_config, tokenizer, seed, train, decoupled_rows),
            text_sections=(data_config.text,) if multiview is None
            else multiview.text_sections(data_config.text),
            pixels=pixels,
            other_views=None if multiview is None else OtherViews(reader, seed),
            decoupled_rows=decoupled_rows, assemble=BatchStage(fields, pixels), train=train)

    def read(self, step: tf.Tensor) -> dict[str, tf.Tensor]:
        rows = self.records(step)
        if self.decoupled_rows is not None:
            rows.update(self.decoupled_rows.choose(step))
        if self.other_views is not None:
            rows.update(self.other_views.read(rows))
        return rows

    def examples(self, rows: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        example = self.parse(rows["serialized"])
        out = {"position": rows["position"], "study_id": text_hash(example["study_id"]),
               "encoded_image": example["image"]}
        out["text"], out["tokens"], prompted = self.texts(example, rows, self.text_sections[0])
        if self.other_views is not None:
            out["text2"], out["tokens2"], _ = self.texts(example, rows, self.text_sections[1],
                                                         stream=SECOND_STREAM)
            out["encoded_image2"] = self.other_views.second_image(rows, example["image"])
        good = tf.ones_like(rows["valid"])
        for stream, name in enumerate(IMAGE_NAMES):
            if f"encoded_{name}" in out:
                good &= self.pixels.intact(out[f"encoded_{name}"])
                warp = self.pixels.warps(out[f"encoded_{name}"], rows["position"], stream)
                if warp is not None:  # Applied per image by `decode`.
                    out[f"warp_{name}"] = warp
        if self.train:  # Training needs a text; evaluation also scores image-only rows.
            for name in ("text", "text2"):
                if name in out:
                    good &= tf.strings.length(out[name]) > 0
        out.update(decode=rows["valid"] & good,
                   num_skipped=tf.cast(rows["valid"] & ~good, tf.int32))
        labels = tf.cast(example["labels"], tf.float32)
        labels.set_shape([self.records.local_batch_size, NUM_FINDINGS])
        present = tf.logical_not(tf.math.is_nan(labels))
        out.update(labels=tf.where(present, labels, tf.zeros_like(labels)),
                   labels_present=present)
        if self.decoupled_rows is not None:
            out.update(self.decoupled_rows.masks(example, rows, out["labels"], prompted))
        if not self.train:
            out["view"] = example["view"]
        return out

    def decode(self, row: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        row = dict(row)
        for name in IMAGE_NAMES:
            if f"encoded_{name}" in row:
                row[name] = self.pixels.decode(row.pop(f"encoded_{name}"), row["decode"],
                                               row.pop(f"warp_{name}", None))
        return row
