"""Multi-view training batches (`data.multiview`, input_pipeline/stages/views.py): a second
view of the study (or a second augmentation of a one-view study's image) and a second
text, checked against the records; order and resume stay exact."""

import numpy as np
import pytest
import tensorflow as tf
from pipeline_reference import synthetic_data_config, warp_from_source

from input_pipeline import pipeline, tokenizer
from input_pipeline.augment import AugmentConfig, photometric, uniform
from input_pipeline.stages import pixels, source, views

GLOBAL_BATCH = 8
AUGMENT = dict(crop_scale=(0.5, 1.0), rotation_degrees=10.0, brightness=0.1, contrast=0.1,
               gamma=0.1)


def data_config(data_dir, **overrides):
    return synthetic_data_config(data_dir, **{
        "text": "sentences", "augment": AUGMENT, "multiview": True, **overrides})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def config(data_dir):
    return data_config(data_dir)


@pytest.fixture(scope="module")
def prepared(config):
    return pipeline.prepare(config)


@pytest.fixture(scope="module")
def records(prepared):
    """Every train record: serialized bytes and the parsed features (image left PNG)."""
    builder, _ = prepared
    reader = source.RecordReader(builder, "train")
    serialized = reader.read(np.arange(len(reader)))
    parsed = source.record_parser(builder)(tf.constant(serialized.tolist()))
    return {k: v.numpy() for k, v in parsed.items()}


def batches(config, prepared, count, *, start_step=0, process_index=0, process_count=1,
            train=True):
    builder, tok = prepared
    dataset = pipeline.make_dataset(config, builder, tok, "train" if train else "validation",
                                    global_batch_size=GLOBAL_BATCH, train=train, seed=0,
                                    process_index=process_index,
                                    process_count=process_count, start_step=start_step)
    return list(dataset.take(count).as_numpy_iterator())


def rows_of(records, steps):
    """(record index, other-view record or -1, position) of every row of steps 0..steps-1,
    recomputed from the order and the study index."""
    num = len(records["study_id"])
    positions = np.arange(steps * GLOBAL_BATCH)
    index = source.EpochOrder(num, 0).records_at(positions)
    u = uniform(0, views.SALT_OTHER_VIEW, positions, 1)[:, 0].numpy()
    other = views.StudyIndex(records["study_id"]).other_views(index, u)
    return index, other, positions


def expected_image2(config, records, index, other, positions):
    """The pipeline's image2 rows: the other view (or the image itself), augmented with
    the second stream, normalised."""
    source = np.where(other >= 0, other, index)
    augment = AugmentConfig.from_config(AUGMENT)
    images = tf.stack([
        warp_from_source(pixels.decode_png(records["image"][r]), position, 0, augment,
                         config.image_size, stream=views.SECOND_STREAM)
        for r, position in zip(source, positions, strict=True)])
    images = photometric(images, positions, 0, augment, stream=views.SECOND_STREAM)
    return ((images - config.image_mean) / config.image_std).numpy()


def test_study_index_picks_another_record_of_the_study():
    ids = np.array([b"a", b"b", b"a", b"c", b"a", b"b"], object)
    index = views.StudyIndex(ids)
    records = np.repeat(np.arange(6), 50)
    u = np.random.default_rng(0).random(len(records))
    other = index.other_views(records, u)
    assert (other[records == 3] == -1).all()  # A one-record study has no other view.
    for r in (0, 1, 2, 4, 5):
        chosen = set(other[records == r].tolist())
        assert chosen == {s for s in range(6) if ids[s] == ids[r] and s != r}, r


def test_batches_hold_a_second_view_and_text(config, prepared, records):
    steps = 3
    got = batches(config, prepared, steps)
    batch = got[0]
    b, size, length = GLOBAL_BATCH, config.image_size, config.max_text_len
    expected = {"image": (np.float32, (b, size, size, 1)), "tokens": (np.int32, (b, length)),
                "study_id": (np.int32, (b,)), "text_id": (np.int32, (b,)),
                "labels": (np.float32, (b, 14)), "labels_present": (np.bool_, (b, 14)),
                "mask": (np.bool_, (b,)), "num_skipped": (np.int32, (b,)),
                "image2": (np.float32, (b, size, size, 1)), "tokens2": (np.int32, (b, length)),
                "text_id2": (np.int32, (b,))}
    assert {k: (v.dtype.type, v.shape) for k, v in batch.items()} == expected

    index, other, positions = rows_of(records, steps)
    two_view, one_view = other >= 0, other < 0
    assert two_view.any() and one_view.any()  # Both kinds of study are checked.
    views = records["view"]
    assert (records["study_id"][other[two_view]] == records["study_id"][index[two_view]]).all()
    assert (views[other[two_view]] != views[index[two_view]]).all()  # PA <-> LATERAL.
    image2 = np.concatenate([g["image2"] for g in got])
    image = np.concatenate([g["image"] for g in got])
    np.testing.assert_allclose(image2, expected_image2(config, records, index, other,
                                                       positions), atol=1e-5)
    # A one-view study's second image is its own image, augmented differently.
    for i in np.flatnonzero(one_view):
        assert np.abs(image2[i] - image[i]).max() > 0.1, i
    # Second texts: another sentence sample of the same report.
    tokens, tokens2 = (np.concatenate([g[k] for g in got]) for k in ("tokens", "tokens2"))
    differs = [not np.array_equal(tokens[i], tokens2[i]) for i in range(len(tokens))]
    assert np.mean(differs) > 0.5
    text_id, text_id2 = (np.concatenate([g[k] for g in got]) for k in ("text_id", "text_id2"))
    np.testing.assert_array_equal(text_id == text_id2, ~np.array(differs))


def test_findings_and_impression_as_the_two_texts(data_dir, prepared, records):
    config = data_config(data_dir, text="report", multiview_texts="findings_impression")
    _, tok = prepared
    got = batches(config, prepared, 2)
    index, _, _ = rows_of(records, 2)
    tokens, tokens2 = (np.concatenate([g[k] for g in got]) for k in ("tokens", "tokens2"))
    for row, r in enumerate(index):
        findings = tokenizer.normalize_text(records["findings"][r].decode())
        impression = tokenizer.normalize_text(records["impression"][r].decode())
        np.testing.assert_array_equal(tokens[row], tok.encode_batch([findings or impression])[0])
        np.testing.assert_array_equal(tokens2[row], tok.encode_batch([impression or findings])[0])
    assert any(not np.array_equal(a, b) for a, b in zip(tokens, tokens2, strict=True))


def test_resume_and_process_slices_stay_exact(config, prepared):
    uninterrupted = batches(config, prepared, 5)  # 40 rows: more than one epoch.
    resumed = batches(config, prepared, 2, start_step=3)
    halves = [batches(config, prepared, 5, process_index=p, process_count=2) for p in (0, 1)]
    for step, batch in enumerate(uninterrupted):
        for key, value in batch.items():
            if step >= 3:
                np.testing.assert_array_equal(resumed[step - 3][key], value, err_msg=key)
            joined = np.concatenate([h[step][key] for h in halves])
            np.testing.assert_array_equal(joined, value, err_msg=f"{key} at step {step}")


def test_first_view_and_text_are_unchanged_and_evaluation_ignores_it(data_dir, config,
                                                                     prepared):
    plain = data_config(data_dir, multiview=False)
    with_views, without = batches(config, prepared, 2), batches(plain, prepared, 2)
    for a, b in zip(with_views, without, strict=True):
        assert set(a) - set(b) == {"image2", "tokens2", "text_id2"}
        for key, value in b.items():
            np.testing.assert_array_equal(a[key], value, err_msg=key)
    evaluation = batches(config, prepared, 1, train=False)[0]
    expected = batches(plain, prepared, 1, train=False)[0]
    assert evaluation.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(evaluation[key], value, err_msg=key)


@pytest.mark.parametrize("overrides, message", [
    (dict(augment=None), r"data.multiview needs data.augment"),
    (dict(text="report"), r"data.text='report' always gives the same text"),
    (dict(text="findings", multiview_texts="findings_impression"), r"asks for one"),
    (dict(multiview_texts="labels"), r"data.multiview_texts='labels' is unknown; choose one of"),
])
def test_contradicting_configs_are_refused(data_dir, prepared, overrides, message):
    with pytest.raises(ValueError, match=message):
        batches(data_config(data_dir, **overrides), prepared, 1)


def test_label_prompt_rows_get_a_second_prompt_draw(data_dir, prepared, records):
    from input_pipeline import label_prompts, labeler

    config = data_config(data_dir, decoupled=dict(label_prompt_fraction=0.5))
    _, tok = prepared
    [batch] = batches(config, prepared, 1)
    index, _, positions = rows_of(records, 1)
    prompted = batch["label_prompt"]
    assert prompted.sum() == GLOBAL_BATCH // 2
    for row in np.flatnonzero(prompted):
        texts = [labeler.labels_to_prompt(records["labels"][index[row]], np.random.default_rng(
            [0, label_prompts.SALT_PROMPT_TEXT, stream, int(positions[row])]))
            for stream in (0, views.SECOND_STREAM)]
        expected = tok.encode_batch([tokenizer.normalize_text(t) for t in texts])
        np.testing.assert_array_equal(batch["tokens"][row], expected[0])
        np.testing.assert_array_equal(batch["tokens2"][row], expected[1])
