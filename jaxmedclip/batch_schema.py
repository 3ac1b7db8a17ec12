"""The batch the input pipeline yields: every field's name, shape and dtype, in one place.

numpy only (no jax, no tensorflow): `input_pipeline` builds and checks its batches
against it, and the training code can describe the batch it will be given
(`jax.ShapeDtypeStruct(shape, dtype)` per field) without reading any data.

    fields = batch_fields(config.data, batch_size, train=True)
    fields["image"]  # ((batch_size, S, S, 1), dtype('float32'))

Fields of every batch (b rows; S = `data.image_size`, L = `data.max_text_len`):

  image           float32 [b, S, S, 1]  normalised: (x - data.image_mean) / data.image_std;
                  or, with data.image_dtype uint16 / uint8, round(x * 65535 / 255) of
                  the [0, 1] intensities x, normalised on the device (models/vit.py)
  tokens          int32 [b, L]  BOS + pieces + EOS, 0-padded (input_pipeline/tokenizer.py)
  study_id        int32 [b]  non-negative hash of the study id: views of a study match
  text_id         int32 [b]  non-negative hash of the normalised text: equal texts match
  labels          float32 [b, 14]  CheXpert order (vocabulary.py): 1 / 0 / -1; blank -> 0
  labels_present  bool [b, 14]  False where the label is blank (not mentioned)
  mask            bool [b]  False for padding rows and skipped examples
  num_skipped     int32 [b]  1 where a bad example was skipped (its row is masked out);
                  the batch's sum is its count of skipped examples

Training only (`train=True`), by config switch:

  data.multiview  image2 float32 [b, S, S, 1], tokens2 int32 [b, L], text_id2 int32 [b]:
                  a second view and a second text of the example
  data.decoupled  label_prompt bool [b]: the text is the record's labels written as text;
                  image_mask bool [b]: False for a text-label example (a report without
                  its image); text_mask bool [b]: True on every example row

Evaluation only (`train=False`): text and view, object [b] of bytes (the normalised text;
"PA" / "AP" / "LATERAL"). Rows with mask False are all zeros (texts empty).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxmedclip import config_schema
from jaxmedclip.vocabulary import CHEXPERT_FINDINGS

IMAGE_CHANNELS = 1  # Grayscale: the pipeline decodes every image to one channel.

Field = tuple[tuple[int, ...], np.dtype]


def batch_fields(data_config: Mapping[str, Any], batch_size: int, *, train: bool = True
                 ) -> dict[str, Field]:
    """name -> (shape, dtype) of every field of a batch of `batch_size` rows that the
    input pipeline yields for `data_config` (see the module docstring)."""
    data_config = config_schema.filled("data", data_config)
    b, size, length = batch_size, data_config["image_size"], data_config["max_text_len"]
    image = ((b, size, size, IMAGE_CHANNELS), np.dtype(data_config["image_dtype"]))
    tokens = ((b, length), np.dtype(np.int32))
    row_int, row_bool = ((b,), np.dtype(np.int32)), ((b,), np.dtype(np.bool_))
    num_labels = len(CHEXPERT_FINDINGS)
    fields = {
        "image": image,
        "tokens": tokens,
        "study_id": row_int,
        "text_id": row_int,
        "labels": ((b, num_labels), np.dtype(np.float32)),
        "labels_present": ((b, num_labels), np.dtype(np.bool_)),
        "mask": row_bool,
        "num_skipped": row_int,
    }
    if not train:
        fields.update(text=((b,), np.dtype(object)), view=((b,), np.dtype(object)))
        return fields
    if data_config.multiview:
        fields.update(image2=image, tokens2=tokens, text_id2=row_int)
    if data_config.decoupled is not None:
        fields.update(label_prompt=row_bool, image_mask=row_bool, text_mask=row_bool)
    return fields


def mismatches(fields: Mapping[str, Field], batch: Mapping[str, tuple[Any, Any]]
               ) -> list[str]:
    """What differs between the expected `fields` and a batch's (shape, dtype) per name
    (a shape is anything `tuple()` takes, or a TensorFlow shape, unknown sizes None);
    empty when they agree exactly."""
    problems = [f"missing {name}" for name in fields if name not in batch]
    problems += [f"unexpected {name}" for name in batch if name not in fields]
    for name, (shape, dtype) in fields.items():
        if name not in batch:
            continue
        got_shape, got_dtype = batch[name]
        got = (_shape(got_shape), np.dtype(got_dtype))
        if got != (tuple(shape), np.dtype(dtype)):
            problems.append(f"{name} is {got[1]} {got[0]}, expected {np.dtype(dtype)} "
                            f"{tuple(shape)}")
    return problems


def _shape(shape: Any) -> tuple[int | None, ...] | None:
    """A shape as a tuple; None when even its rank is unknown (a TensorFlow shape)."""
    if getattr(shape, "rank", 0) is None:
        return None
    return tuple(None if d is None else int(d) for d in shape)


def intensities(images: np.ndarray, image_mean: float, image_std: float) -> np.ndarray:
    """Batch images, either kind (see `image` above) -> float64 [0, 1] intensities (a
    normalised float image can fall outside [0, 1] where augmentation pushed it)."""
    images = np.asarray(images)
    if np.issubdtype(images.dtype, np.integer):
        return images.astype(np.float64) / np.iinfo(images.dtype).max
    return images.astype(np.float64) * image_std + image_mean
