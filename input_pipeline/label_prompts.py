"""Decoupled examples (MedCLIP / CXR-CLIP): image-label rows (a record's labels written as
text) and text-label rows (a report without its image).

Configured by `data.decoupled` (absent or None: off; training batches are then exactly
what they were without it):

  label_prompt_fraction  fraction of the rows of every global training batch that are
                       image-label examples: their text is `labeler.labels_to_prompt`
                       of the record's labels instead of its report.
  text_only_fraction   fraction of the rows of every global training batch that are
                       text-label examples: their text is their report as usual and
                       their image is masked out of the loss (`image_mask` False), so the
                       report is matched to the batch's images by label similarity alone.
                       Needs `loss.targets="soft_labels"` (under one_hot or
                       multi_positive a report without its image has no positive) and
                       neither `data.multiview` / `loss.multiview` nor `loss.local`
                       (those need both sides of every example); `jaxmedclip.train`
                       refuses the other combinations.
  label_only_prompts   (default True) records without a report (`has_report` False, e.g.
                       CheXpert) always take their label prompt, instead of being skipped
                       as examples with an empty text.

Both fractions are in [0, 1] with a sum of at most 1. One uniform draw per position,
from (seed, position), ranks the rows of each global batch: the round(label_prompt_fraction
* B) lowest are chosen as image-label rows, the next round(text_only_fraction * B) as
text-label rows, so the two are disjoint and their counts are fixed.

Batches then also hold `label_prompt` bool [b]: True where the text is the label prompt,
and the per-side masks of `jaxmedclip.losses`: `image_mask` bool [b], False on
text-label rows, and `text_mask` bool [b], True on every example row (every example has
a text). The image of a text-label row is still read, decoded and run through the image
tower (shapes stay static under jit); only its embedding is left out of the loss, so a
text-label row costs as much compute as a paired one.

A chosen row that cannot be what it was chosen for stays a paired example: a row whose
labels are all blank has no prompt (an empty text), so an image-label row keeps its
report and a label-only record is skipped; a text-label row whose label row is all zero
once blanks are 0 (all blank, or only negative mentions) keeps its image, because
without its image such a report has no soft target (its target mass over the other
images is zero, and the loss would only use it as a negative of every image, which its
missing labels do not justify); a record without a report keeps its image and reads its
prompt. Batches then hold fewer decoupled rows than chosen; exactly the chosen counts
when every record has a report and a non-zero label row. The rows are chosen from (seed,
position) without reading the records, so every process chooses its slice of the global
batch alone. With `data.multiview`, the second text of a prompt row is a second prompt
draw. Prompts (templates, synonyms, order) are drawn from (seed, position, text stream)
only, so order and resume stay exact. Evaluation (train=False) ignores all of this.

A dataset that has reports but no labels can get them from the report labeler
(`labeler.label_reports`) when it is built; the pipeline reads the records' `labels`.
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from input_pipeline import labeler
from jaxmedclip import config_schema

SALT_PROMPT_ROWS = 31  # Which rows of a global batch are image- / text-label examples.
SALT_PROMPT_TEXT = 32  # Templates of a row's prompt (plus the text stream).
_DEFAULT = config_schema.defaults("data.decoupled")  # The defaults are declared there.


@dataclasses.dataclass(frozen=True)
class DecoupledData:
    """The validated contents of `data.decoupled` (see the module docstring)."""

    label_prompt_fraction: float = _DEFAULT["label_prompt_fraction"]
    text_only_fraction: float = _DEFAULT["text_only_fraction"]
    label_only_prompts: bool = _DEFAULT["label_only_prompts"]

    @classmethod
    def from_config(cls, data_config: ml_collections.ConfigDict) -> DecoupledData | None:
        """None when `data.decoupled` is absent; a ValueError names a bad field."""
        data_config = config_schema.filled("data", data_config)
        config = data_config.decoupled
        if config is None:
            return None
        spec = cls(**config_schema.complete_section("data.decoupled", config))
        for name in ("label_prompt_fraction", "text_only_fraction"):
            value = getattr(spec, name)
            if not 0 <= value <= 1:
                raise ValueError(f"data.decoupled.{name}={value} outside [0, 1]")
        if spec.label_prompt_fraction + spec.text_only_fraction > 1 + 1e-9:
            raise ValueError(
                f"data.decoupled.label_prompt_fraction={spec.label_prompt_fraction} plus "
                f"text_only_fraction={spec.text_only_fraction} is more than the whole batch;"
                " their sum must be at most 1")
        if spec.text_only_fraction and data_config.multiview:
            raise ValueError(
                f"data.decoupled.text_only_fraction={spec.text_only_fraction} with "
                "data.multiview: the multi-view terms need both images and both texts of "
                "every example, and a text-label row has no image; set one of them off")
        return spec

    def label_prompt_rows(self, global_batch_size: int) -> int:
        """The number of image-label rows chosen in every global batch."""
        return int(round(self.label_prompt_fraction * global_batch_size))

    def text_only_rows(self, global_batch_size: int) -> int:
        """The number of text-label rows chosen in every global batch."""
        return min(int(round(self.text_only_fraction * global_batch_size)),
                   global_batch_size - self.label_prompt_rows(global_batch_size))


def prompts(labels: np.ndarray, positions: np.ndarray, seed: int, stream: int) -> np.ndarray:
    """object [N] of bytes: `labels_to_prompt` of each label row (float [N, 14], NaN
    blank), its templates drawn from (seed, position, stream); b"" for all-blank rows."""
    out = np.empty(len(labels), dtype=object)
    for i, (row, position) in enumerate(zip(labels, positions.tolist(), strict=True)):
        rng = np.random.default_rng([seed, SALT_PROMPT_TEXT, stream, position])
        out[i] = labeler.labels_to_prompt(row, rng).encode()
    return out
