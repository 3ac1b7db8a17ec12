"""The last stage: decoded rows -> the batch `jaxmedclip.batch_schema` describes.

Images are augmented (training) and normalised, texts hashed into `text_id`s, and every
row of a skipped example or a padding row (mask False) zeroed (texts emptied). The
batch's fields are checked against the schema when the pipeline is built.

Bad data. An example whose image is not an intact PNG (signature, chunk CRCs, IHDR,
IDAT, IEND), or, in training, whose text is empty (also `has_report` False), is skipped:
its row keeps its place with mask False, so the order of every other example is
unchanged, and `num_skipped` counts it. Once a process has read `min(1000, its share of
the split)` examples, more than `data.max_bad_fraction` (default 0.05) of them skipped
stops the iteration with an error naming the counts. (Building records has its own
limit, `data.build_max_bad_fraction`, builder_common.py.)
"""

from __future__ import annotations

import tensorflow as tf

from input_pipeline.stages.pixels import IMAGE_NAMES, PixelStage
from input_pipeline.stages.text import text_hash
from jaxmedclip import config_schema
from jaxmedclip.batch_schema import Field, mismatches

DEFAULT_MAX_BAD_FRACTION = config_schema.FIELDS["data"]["max_bad_fraction"].default
BAD_FRACTION_MIN_EXAMPLES = 1000
_TEXT_IDS = {"text": "text_id", "text2": "text_id2"}


class BatchStage:
    """A batch of rows (`position`, `decode` (the mask), `num_skipped`, decoded images,
    texts, tokens, ...) -> the schema's fields, nothing else."""

    def __init__(self, fields: dict[str, Field], pixels: PixelStage):
        self.fields, self.pixels = fields, pixels

    def __call__(self, rows: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        rows = dict(rows)
        positions, mask = rows.pop("position"), rows.pop("decode")
        for stream, name in enumerate(IMAGE_NAMES):
            if name in rows:
                rows[name] = self.pixels.finish(rows[name], positions, stream)
        for text, text_id in _TEXT_IDS.items():
            if text in rows:
                rows[text_id] = text_hash(rows[text])
        batch = {"mask": mask, "num_skipped": rows["num_skipped"]}
        for name in self.fields:
            if name not in batch and name in rows:
                value = rows[name]
                keep = tf.reshape(mask, [-1] + [1] * (value.shape.rank - 1))
                batch[name] = tf.where(keep, value, tf.zeros_like(value))
        problems = mismatches(self.fields, {
            name: (value.shape, value.dtype.as_numpy_dtype) for name, value in batch.items()})
        if problems:
            raise ValueError(f"the pipeline's batch does not match jaxmedclip/batch_schema.py: "
                             f"{'; '.join(problems)}")
        return batch


def stop_above_bad_fraction(dataset: tf.data.Dataset, max_bad_fraction: float,
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
