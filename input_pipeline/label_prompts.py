"""Image-label training examples: a record's labels written as text (MedCLIP / CXR-CLIP).

Configured by `data.decoupled` (absent or None: off; training batches are then exactly
what they were without it):

  image_only_fraction  fraction of the rows of every global training batch that are
                       image-label examples: their text is `labeler.labels_to_prompt`
                       of the record's labels instead of its report. Exactly
                       round(fraction * global_batch_size) rows per global batch,
                       chosen at random from (seed, position).
  label_only_prompts   (default True) records without a report (`has_report` False, e.g.
                       CheXpert) always take their label prompt, instead of being skipped
                       as examples with an empty text.
  text_only_fraction   must be 0: text-label examples (a report without its image) need
                       per-side validity masks in `jaxmedclip.losses` (an image that is
                       neither a candidate nor a query), which do not exist yet.

Batches then also hold `label_prompt` bool [b]: True where the text is the label prompt.
A row whose labels are all blank has no prompt (an empty text): a chosen row keeps its
report, a label-only record is skipped. With `data.multiview`, the second text of a
prompt row is a second prompt draw. Prompts (templates, synonyms, order) are drawn from
(seed, position, text stream) only, so order and resume stay exact. Evaluation
(train=False) ignores all of this.

A dataset that has reports but no labels can get them from the report labeler
(`labeler.label_reports`) when it is built; the pipeline reads the records' `labels`.
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from input_pipeline import labeler

SALT_PROMPT_ROWS = 31  # Which rows of a global batch are image-label examples.
SALT_PROMPT_TEXT = 32  # Templates of a row's prompt (plus the text stream).


@dataclasses.dataclass(frozen=True)
class DecoupledData:
    """The validated contents of `data.decoupled` (see the module docstring)."""

    image_only_fraction: float = 0.0
    text_only_fraction: float = 0.0
    label_only_prompts: bool = True

    @classmethod
    def from_config(cls, data_config: ml_collections.ConfigDict) -> DecoupledData | None:
        """None when `data.decoupled` is absent; a ValueError names a bad field."""
        config = data_config.get("decoupled")
        if config is None:
            return None
        values = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown data.decoupled keys {unknown}; known: {sorted(known)}")
        spec = cls(**values)
        if not 0 <= spec.image_only_fraction <= 1:
            raise ValueError(f"data.decoupled.image_only_fraction={spec.image_only_fraction} "
                             "outside [0, 1]")
        if spec.text_only_fraction:
            raise ValueError(
                f"data.decoupled.text_only_fraction={spec.text_only_fraction}: text-label "
                "examples (a report without its image) are not supported yet; they need "
                "per-side validity masks in jaxmedclip.losses. Set it to 0")
        return spec

    def rows_per_batch(self, global_batch_size: int) -> int:
        """The number of image-label rows chosen in every global batch."""
        return int(round(self.image_only_fraction * global_batch_size))


def prompts(labels: np.ndarray, positions: np.ndarray, seed: int, stream: int) -> np.ndarray:
    """object [N] of bytes: `labels_to_prompt` of each label row (float [N, 14], NaN
    blank), its templates drawn from (seed, position, stream); b"" for all-blank rows."""
    out = np.empty(len(labels), dtype=object)
    for i, (row, position) in enumerate(zip(labels, positions.tolist(), strict=True)):
        rng = np.random.default_rng([seed, SALT_PROMPT_TEXT, stream, position])
        out[i] = labeler.labels_to_prompt(row, rng).encode()
    return out
