"""jaxmedclip/batch_schema.py: the fields it lists are exactly those the pipeline yields,
for every config switch, in training and evaluation."""

import ml_collections
import numpy as np
import pytest
from pipeline_reference import synthetic_data_config

from input_pipeline import pipeline
from jaxmedclip.batch_schema import batch_fields, mismatches

GLOBAL_BATCH = 8
AUGMENT = dict(crop_scale=(0.5, 1.0), rotation_degrees=10.0, brightness=0.1)


def data_config(data_dir, **overrides):
    return synthetic_data_config(data_dir, **{"text": "sentences", **overrides})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def prepared(data_dir):
    return pipeline.prepare(data_config(data_dir))


SWITCHES = {
    "plain": {},
    "augmented": dict(augment=AUGMENT),
    "multiview": dict(augment=AUGMENT, multiview=True),
    "decoupled": dict(decoupled=dict(label_prompt_fraction=0.25, text_only_fraction=0.25)),
    "multiview_and_prompts": dict(augment=AUGMENT, multiview=True,
                                  multiview_texts="findings_impression",
                                  decoupled=dict(label_prompt_fraction=0.5)),
}


# Training batches of "plain" and "multiview" are slow tests: "augmented" and
# "multiview_and_prompts" hold their fields and more.
SUBSUMED = {("plain", True), ("multiview", True)}


@pytest.mark.parametrize("switch, train", [
    pytest.param(switch, train, id=f"{switch}-{'train' if train else 'eval'}",
                 marks=[pytest.mark.slow] if (switch, train) in SUBSUMED else [])
    for switch in SWITCHES for train in (True, False)])
def test_batches_match_the_schema(data_dir, prepared, switch, train):
    builder, tok = prepared
    config = data_config(data_dir, **SWITCHES[switch])
    for process_count in (1, 2):
        dataset = pipeline.make_dataset(
            config, builder, tok, "train" if train else "validation",
            global_batch_size=GLOBAL_BATCH, train=train, seed=0, process_index=0,
            process_count=process_count)
        batch = next(dataset.as_numpy_iterator())
        expected = batch_fields(config, GLOBAL_BATCH // process_count, train=train)
        got = {name: (value.shape, value.dtype) for name, value in batch.items()}
        assert got == expected
        assert mismatches(expected, got) == []


def test_fields_per_switch():
    config = ml_collections.ConfigDict(dict(image_size=16, max_text_len=12))
    plain = batch_fields(config, 4)
    assert plain["image"] == ((4, 16, 16, 1), np.dtype(np.float32))
    assert plain["tokens"] == ((4, 12), np.dtype(np.int32))
    assert plain["labels"] == ((4, 14), np.dtype(np.float32))
    assert plain["num_skipped"] == ((4,), np.dtype(np.int32))
    assert set(plain) == {"image", "tokens", "study_id", "text_id", "labels",
                          "labels_present", "mask", "num_skipped"}
    config.multiview = True
    config.decoupled = dict(label_prompt_fraction=0.5)
    both = batch_fields(config, 4)
    assert set(both) - set(plain) == {"image2", "tokens2", "text_id2", "label_prompt",
                                      "image_mask", "text_mask"}
    evaluation = batch_fields(config, 4, train=False)  # The switches are training's.
    assert set(evaluation) - set(plain) == {"text", "view"}
    assert evaluation["text"] == ((4,), np.dtype(object))


def test_mismatches_name_each_difference():
    config = ml_collections.ConfigDict(dict(image_size=16, max_text_len=12))
    fields = batch_fields(config, 4)
    drifted = {k: v for k, v in fields.items() if k != "num_skipped"}
    drifted["tokens"] = ((4, 13), np.int32)
    drifted["mask"] = ((4,), np.int32)
    drifted["extra"] = ((4,), np.float32)
    assert sorted(mismatches(fields, drifted)) == sorted([
        "missing num_skipped", "unexpected extra",
        "tokens is int32 (4, 13), expected int32 (4, 12)",
        "mask is int32 (4,), expected bool (4,)"])


def test_batch_stage_refuses_a_batch_that_drifted_from_the_schema():
    import tensorflow as tf

    from input_pipeline.stages.batch import BatchStage
    from input_pipeline.stages.pixels import PixelStage

    config = ml_collections.ConfigDict(dict(image_size=4, max_text_len=3, image_mean=0.5,
                                            image_std=0.25))
    rows = {"position": tf.range(2, dtype=tf.int64), "decode": tf.constant([True, False]),
            "num_skipped": tf.constant([0, 1], tf.int32), "image": tf.ones([2, 4, 4, 1]),
            "tokens": tf.ones([2, 3], tf.int32), "text": tf.constant(["a", "b"]),
            "study_id": tf.ones([2], tf.int32), "labels": tf.ones([2, 14]),
            "labels_present": tf.ones([2, 14], tf.bool)}
    stage = BatchStage(batch_fields(config, 2), PixelStage(config, seed=0, train=False))
    batch = stage(rows)
    np.testing.assert_array_equal(batch["image"][1], 0)  # The skipped row is zeroed.
    np.testing.assert_array_equal(batch["image"][0], 2)  # (1 - 0.5) / 0.25
    with pytest.raises(ValueError, match="batch_schema.py: missing labels_present"):
        stage({k: v for k, v in rows.items() if k != "labels_present"})
    with pytest.raises(ValueError, match=r"tokens is int32 \(2, 5\), expected int32 \(2, 3\)"):
        stage({**rows, "tokens": tf.ones([2, 5], tf.int32)})
