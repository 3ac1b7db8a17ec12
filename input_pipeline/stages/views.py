"""The multi-view stage (CXR-CLIP): a second image and a second text per example.

Configured by `data.multiview` (absent or False: off; training batches are then exactly
what they were without it) and `data.multiview_texts`. With it on, every training
example also yields

  image2     another view of the same study when the study has one (records share
             `study_id`; with several others, one drawn from (seed, position)), else
             the example's own image; augmented independently of `image` (stream 1 of
             augment.py's salts)
  tokens2, text_id2  the second text, tokenized and hashed like the first

The second text (`data.multiview_texts`):
  "resample" (default): a second, independent draw of `data.text="sentences"` from the
      same report (another sentence subset and order; stream 1 of the sentence salts).
      Other values of `data.text` are deterministic, so both texts would be the same
      and this is refused.
  "findings_impression": text 1 is the FINDINGS section, text 2 the IMPRESSION (each
      falling back to the other section when it is empty, so a one-section report gives
      two equal texts, or with "sentences", two samples of its sentences). With
      `data.text="sentences"` each text is a sentence sample of its section; with
      "report" / "both" each is its whole section; "findings" / "impression" contradict
      the choice and are refused.

An example is kept (mask True) only when both images are intact PNGs and, as for the
first text, the second text is not empty; otherwise it is skipped and counted in
`num_skipped` like any bad example. Every draw is a function of (seed, position), so the
order stays exact on resume and the same for any number of processes. Evaluation
(train=False) ignores these fields.

The other views come from a study index (`StudyIndex`) built when the dataset is made:
every record of the split is read once for its `study_id` (for a large dataset this read
costs a pass over the split's files).
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np
import tensorflow as tf

from input_pipeline.augment import AugmentConfig, uniform
from input_pipeline.stages.source import RecordReader
from jaxmedclip import config_schema

MULTIVIEW_TEXTS = config_schema.MULTIVIEW_TEXTS
SALT_OTHER_VIEW = 21  # Which other view of a study (augment.py and the other stages: others).
SECOND_STREAM = 1  # Salt stream of the second image's augmentation and second text.
_STUDY_ID_CHUNK = 4096


@dataclasses.dataclass(frozen=True)
class MultiviewData:
    """`data.multiview` and `data.multiview_texts`, checked against the rest of `data`."""

    texts: str = "resample"

    @classmethod
    def from_config(cls, data_config: ml_collections.ConfigDict,
                    augment: AugmentConfig) -> MultiviewData | None:
        """None when `data.multiview` is off; a ValueError names a contradicting field."""
        data_config = config_schema.filled("data", data_config)
        if not data_config.multiview:
            return None
        texts = data_config.multiview_texts  # One of MULTIVIEW_TEXTS (config_schema).
        source = data_config.text
        if texts == "resample" and source != "sentences":
            raise ValueError(
                f"data.multiview_texts='resample' draws the second text as a second sample "
                f"of data.text, but data.text={source!r} always gives the same text; use "
                "data.text='sentences', or data.multiview_texts='findings_impression'")
        if texts == "findings_impression" and source in ("findings", "impression"):
            raise ValueError(
                f"data.multiview_texts='findings_impression' reads both sections, but "
                f"data.text={source!r} asks for one; use data.text='report' (whole "
                "sections) or 'sentences' (a sentence sample of each section)")
        if not augment.enabled:
            raise ValueError(
                "data.multiview needs data.augment: a study with one view gives its own "
                "image as the second view, which must be augmented differently (e.g. "
                "data.augment=dict(crop_scale=(0.6, 1.0), rotation_degrees=10.0))")
        return cls(texts)

    def text_sections(self, text_source: str) -> tuple[str, str]:
        """The `data.text` values the first and the second text are read with."""
        if self.texts == "findings_impression":
            return "findings", "impression"
        return text_source, text_source


def read_study_ids(source: RecordReader, chunk: int = _STUDY_ID_CHUNK) -> np.ndarray:
    """object [N] of bytes: the `study_id` of every record of `source`."""
    spec = {"study_id": tf.io.FixedLenFeature([], tf.string)}
    parts = []
    for start in range(0, len(source), chunk):
        serialized = source.read(np.arange(start, min(start + chunk, len(source))))
        parsed = tf.io.parse_example(tf.constant(serialized.tolist(), tf.string), spec)
        parts.append(parsed["study_id"].numpy().astype(object))
    return np.concatenate(parts) if parts else np.empty(0, object)


class StudyIndex:
    """Record -> the other records of its study (same `study_id`), built once."""

    def __init__(self, study_ids: np.ndarray):
        _, study_of = np.unique(np.asarray(study_ids, object), return_inverse=True)
        self.study_of = study_of.reshape(-1).astype(np.int64)
        self.members = np.argsort(self.study_of, kind="stable")  # Records grouped by study.
        counts = np.bincount(self.study_of)
        self.sizes = counts.astype(np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        rank = np.empty_like(self.members)
        rank[self.members] = np.arange(len(self.members))
        self.rank = rank - self.starts[self.study_of]  # Position within its study.

    def other_views(self, records: np.ndarray, u: np.ndarray) -> np.ndarray:
        """int64 [N]: for each record, one other record of its study, chosen uniformly by
        `u` in [0, 1); -1 where the study has no other record."""
        records = np.asarray(records, np.int64)
        study = self.study_of[records]
        others = self.sizes[study] - 1
        pick = np.minimum((np.asarray(u, np.float64) * others).astype(np.int64),
                          np.maximum(others - 1, 0))
        pick = pick + (pick >= self.rank[records])  # Skip the record itself.
        chosen = self.members[np.minimum(self.starts[study] + pick, len(self.members) - 1)]
        return np.where(others > 0, chosen, -1).astype(np.int64)


def read_other_views(source: RecordReader, other: np.ndarray) -> np.ndarray:
    """object [N] of bytes: serialized record `other[i]`, or b"" where it is -1."""
    other = np.asarray(other, np.int64)
    out = np.full(len(other), b"", dtype=object)
    rows = np.flatnonzero(other >= 0)
    if len(rows):
        out[rows] = source.read(other[rows])
    return out


class OtherViews:
    """Rows -> the record each example takes its second image from."""

    def __init__(self, source: RecordReader, seed: int):
        self.source, self.seed = source, seed
        self.study_index = StudyIndex(read_study_ids(source))
        self._image_only = {"image": tf.io.FixedLenFeature([], tf.string, default_value="")}

    def read(self, rows: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """`has_other_view` bool [b] and `serialized_other_view` string [b] (b"" where
        the study has one record) of rows with `index` and `position`."""
        u = uniform(self.seed, SALT_OTHER_VIEW, rows["position"], 1)[:, 0]
        other = tf.numpy_function(self.study_index.other_views, [rows["index"], u], tf.int64,
                                  stateful=False, name="other_view")
        other.set_shape(rows["index"].shape)
        serialized = tf.numpy_function(lambda o: read_other_views(self.source, o), [other],
                                       tf.string, stateful=False, name="read_other_views")
        serialized.set_shape(other.shape)
        return {"has_other_view": other >= 0, "serialized_other_view": serialized}

    def second_image(self, rows: dict[str, tf.Tensor], image: tf.Tensor) -> tf.Tensor:
        """PNG bytes [b]: the other view where the study has one, else `image`."""
        other = tf.io.parse_example(rows["serialized_other_view"], self._image_only)
        return tf.where(rows["has_other_view"], other["image"], image)
