"""The decoupled-rows stage (`data.decoupled`, label_prompts.py): which rows of a global
batch read their labels written as text, which are reports without their image, and
the per-side masks that tell the loss.

One uniform draw per position of the global batch, from (seed, position), ranks its
rows: the lowest `label_prompt_rows` are the label-prompt rows, the next `text_only_rows`
the text-label rows, so the two are disjoint and their counts exact. The rows are chosen
without reading any record, so each process chooses its slice of the global batch alone.
"""

from __future__ import annotations

import tensorflow as tf

from input_pipeline import label_prompts
from input_pipeline.augment import uniform


class DecoupledRows:
    """Chooses the decoupled rows of each batch, puts the label prompts in, and masks."""

    def __init__(self, spec: label_prompts.DecoupledData, seed: int, global_batch_size: int,
                 first: int, local_batch_size: int):
        """`first`: this process's first row within the global batch."""
        self.spec, self.seed = spec, seed
        self.global_batch_size, self.first, self.local_batch_size = (
            global_batch_size, first, local_batch_size)
        self.prompt_rows = spec.label_prompt_rows(global_batch_size)
        self.text_only_rows = spec.text_only_rows(global_batch_size)

    def choose(self, step: tf.Tensor) -> dict[str, tf.Tensor]:
        """`prompt_row` and `text_only_row`, bool [b]: this process's rows chosen in
        global batch `step`."""
        batch_positions = step * self.global_batch_size + tf.range(self.global_batch_size,
                                                                   dtype=tf.int64)
        u = uniform(self.seed, label_prompts.SALT_PROMPT_ROWS, batch_positions, 1)[:, 0]
        rank = tf.argsort(tf.argsort(u, stable=True), stable=True)
        rank = rank[self.first:self.first + self.local_batch_size]
        return {"prompt_row": rank < self.prompt_rows,
                "text_only_row": (rank >= self.prompt_rows)
                & (rank < self.prompt_rows + self.text_only_rows)}

    def prompt_texts(self, example: dict[str, tf.Tensor], rows: dict[str, tf.Tensor],
                     text: tf.Tensor, stream: int) -> tuple[tf.Tensor, tf.Tensor]:
        """(text [b], prompted bool [b]): the label prompt (text stream `stream`) on the
        prompt rows, and on rows without a report where `label_only_prompts`; `text`
        elsewhere, and where the labels are all blank (no prompt)."""
        positions = rows["position"]
        prompt = tf.numpy_function(
            lambda labels, p: label_prompts.prompts(labels, p, self.seed, stream),
            [example["labels"], positions], tf.string, stateful=False, name="label_prompts")
        prompt.set_shape(positions.shape)
        wanted = rows["prompt_row"]
        if self.spec.label_only_prompts and "has_report" in example:
            wanted |= ~tf.cast(example["has_report"], tf.bool)
        use = wanted & (tf.strings.length(prompt) > 0)
        return tf.where(use, prompt, text), use

    def masks(self, example: dict[str, tf.Tensor], rows: dict[str, tf.Tensor],
              labels: tf.Tensor, prompted: tf.Tensor) -> dict[str, tf.Tensor]:
        """`label_prompt`, `image_mask` and `text_mask`, bool [b]. A chosen text-label row
        keeps its image where the loss could not use the row without it: no report (its
        text is then the prompt) or a label row that is all zero (no soft target)."""
        text_only = rows["text_only_row"] & tf.reduce_any(labels != 0, axis=1)
        if "has_report" in example:
            text_only &= tf.cast(example["has_report"], tf.bool)
        return {"label_prompt": prompted, "image_mask": ~text_only,
                "text_mask": tf.ones_like(text_only)}
