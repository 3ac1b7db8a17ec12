"""Training data order is a function of (seed, step): exact resume, any process count."""

import hashlib
import time

import ml_collections
import numpy as np
import pytest

from input_pipeline import pipeline
from input_pipeline.stages.source import EpochOrder

GLOBAL_BATCH = 8


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return ml_collections.ConfigDict(dict(
        name="synthetic_cxr", data_dir=str(tmp_path_factory.mktemp("tfds")),
        synthetic=dict(num_train=24, num_validation=4, num_test=4, source_image_size=32,
                       seed=0),
        image_size=32, image_mean=0.5, image_std=0.25, text="sentences", max_text_len=48,
        vocab_size=256, tokenizer_type="unigram",
        augment=dict(crop_scale=(0.5, 1.0), rotation_degrees=10.0, brightness=0.1,
                     contrast=0.1, gamma=0.1)))


@pytest.fixture(scope="module")
def prepared(config):
    return pipeline.prepare(config)


def batches(config, prepared, count, *, start_step=0, process_index=0, process_count=1,
            seed=0):
    builder, tok = prepared
    dataset = pipeline.make_dataset(config, builder, tok, "train",
                                    global_batch_size=GLOBAL_BATCH, train=True, seed=seed,
                                    process_index=process_index,
                                    process_count=process_count, start_step=start_step)
    return list(dataset.take(count).as_numpy_iterator())


def assert_batches_equal(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_resume_sees_the_uninterrupted_batches(config, prepared):
    uninterrupted = batches(config, prepared, 9)  # 72 rows: more than two epochs.
    for k in (1, 4, 7):
        assert_batches_equal(batches(config, prepared, 9 - k, start_step=k), uninterrupted[k:])
    # Augmented images and chosen sentences differ between batches: the test has teeth.
    assert not np.array_equal(uninterrupted[0]["image"], uninterrupted[3]["image"])


def test_resume_far_ahead_is_immediate(config, prepared):
    start = time.perf_counter()
    far = batches(config, prepared, 2, start_step=10**9)
    assert time.perf_counter() - start < 30  # Not a skip through 10**9 batches.
    assert_batches_equal(batches(config, prepared, 1, start_step=10**9 + 1), far[1:])


@pytest.mark.parametrize("process_count", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_process_slices_make_the_single_process_batches(config, prepared, process_count):
    whole = batches(config, prepared, 5)
    slices = [batches(config, prepared, 5, process_index=p, process_count=process_count)
              for p in range(process_count)]
    for step, batch in enumerate(whole):
        for key, value in batch.items():
            joined = np.concatenate([s[step][key] for s in slices])
            np.testing.assert_array_equal(joined, value, err_msg=f"{key} at step {step}")


def test_every_epoch_is_the_whole_split_once(prepared):
    builder, tok = prepared
    plain = ml_collections.ConfigDict(dict(
        name="synthetic_cxr", synthetic=None, image_size=32, image_mean=0.0,
        image_std=1.0, text="report", max_text_len=48))
    num_records = builder.info.splits["train"].num_examples

    def record_key(batch, i):  # Unaugmented pixels and study tell the records apart.
        return (int(batch["study_id"][i]), hashlib.sha1(batch["image"][i].tobytes()).digest())

    steps = -(-3 * num_records // GLOBAL_BATCH)
    halves = [batches(plain, prepared, steps, process_index=p, process_count=2)
              for p in range(2)]
    stream = [record_key(half[step], i) for step in range(steps) for half in halves
              for i in range(GLOBAL_BATCH // 2)]
    every = {record_key(b, i) for b in batches(plain, prepared, -(-num_records // 2))
             for i in range(GLOBAL_BATCH)}
    assert len(every) == num_records
    epochs = [stream[e * num_records: (e + 1) * num_records] for e in range(3)]
    for epoch in epochs:
        assert len(set(epoch)) == num_records and set(epoch) == every
    assert epochs[0] != epochs[1] != epochs[2]  # A new order each epoch.


def test_order_depends_on_the_seed(config, prepared):
    first = np.concatenate([b["study_id"] for b in batches(config, prepared, 3)])
    other = np.concatenate([b["study_id"] for b in batches(config, prepared, 3, seed=1)])
    assert not np.array_equal(first, other)


def test_epoch_order_after_going_back_to_an_earlier_epoch():
    # A second iterator over the same dataset starts again at epoch 0 while the cache
    # holds later epochs: the cache must not evict the epoch it was just asked for.
    order = EpochOrder(5, seed=3, cached_epochs=2)
    first = order.records_at(np.arange(5))
    later = order.records_at(np.arange(5, 30))  # Epochs 1..5 pass through the cache.
    np.testing.assert_array_equal(order.records_at(np.arange(5)), first)
    np.testing.assert_array_equal(order.records_at(np.arange(5, 30)), later)
    np.testing.assert_array_equal(EpochOrder(5, seed=3).records_at(np.arange(30)),
                                  np.concatenate([first, later]))
