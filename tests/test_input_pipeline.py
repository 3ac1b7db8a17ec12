"""The `synthetic_cxr` TFDS builder and the tf.data pipeline, on a tiny real dataset."""

import io
import os
import socket

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from input_pipeline import pipeline, synthetic_builder, synthetic_cxr, tokenizer
from input_pipeline.findings import NUM_FINDINGS

SIZES = dict(num_train=32, num_validation=8, num_test=8)


def data_config(data_dir, **overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(dict(
        name="synthetic_cxr", data_dir=str(data_dir),
        synthetic=dict(SIZES, source_image_size=64, seed=0),
        image_size=64, image_mean=0.5, image_std=0.25, text="report", max_text_len=48,
        vocab_size=256, tokenizer_type="unigram"))
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return data_config(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def prepared(config):
    return pipeline.prepare(config)


@pytest.fixture(scope="module")
def studies():
    """The generator's studies of every split, by study id."""
    return {study.study_id: study
            for split, count in (("train", 32), ("validation", 8), ("test", 8))
            for study in (synthetic_cxr.generate_study(0, split, i, 64) for i in range(count))}


def records(builder, split):
    """Every record of `split` in stored order, decoded by TFDS."""
    source = builder.as_data_source(split=split)
    return [source[i] for i in range(len(source))]


def record_files(builder):
    return {name: open(os.path.join(builder.data_dir, name), "rb").read()
            for name in sorted(os.listdir(builder.data_dir)) if ".array_record" in name}


def eval_batches(config, builder, tok, split="validation", global_batch_size=4, **kwargs):
    kwargs = {"process_index": 0, "process_count": 1, **kwargs}
    dataset = pipeline.make_dataset(config, builder, tok, split, train=False, seed=0,
                                    global_batch_size=global_batch_size, **kwargs)
    return list(dataset.as_numpy_iterator())


def test_builder_splits_hold_one_record_per_image(prepared, studies):
    builder, _ = prepared
    assert builder.builder_config.name == "n32-8-8_s64_seed0"
    assert builder.data_dir.endswith(os.path.join("synthetic_cxr", "n32-8-8_s64_seed0", "1.1.0"))
    for split, count in SIZES.items():
        split = split.removeprefix("num_")
        rows = records(builder, split)
        ids = {r["study_id"].decode() for r in rows}
        assert len(ids) == count
        assert len(rows) == sum(len(studies[i].views) for i in ids) >= count
        assert builder.info.splits[split].num_examples == len(rows)


def test_records_equal_the_generator(prepared, studies):
    builder, _ = prepared
    for record in records(builder, "validation") + records(builder, "test"):
        study = studies[record["study_id"].decode()]
        view_index = study.views.index(record["view"].decode())
        np.testing.assert_array_equal(record["image"][..., 0], study.images[view_index])
        np.testing.assert_array_equal(record["labels"], study.labels)  # NaN == NaN here.
        assert record["report"].decode() == study.report
        assert record["patient_id"].decode() == study.patient_id
        findings, impression = synthetic_cxr.report_sections(study.report)
        assert (record["findings"].decode(), record["impression"].decode()) == (
            findings, impression)


def test_rebuild_gives_the_same_bytes_in_parallel_and_offline(prepared, tmp_path,
                                                              monkeypatch):
    builder, _ = prepared

    def no_network(*args, **kwargs):
        raise AssertionError("building synthetic_cxr tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    # Small tasks send the splits through two worker processes.
    monkeypatch.setattr(synthetic_builder, "_STUDIES_PER_TASK", 8)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    parallel_calls = []
    in_parallel = synthetic_builder._records_in_parallel

    def spy(ranges, workers):
        parallel_calls.append(workers)
        return in_parallel(ranges, workers)

    monkeypatch.setattr(synthetic_builder, "_records_in_parallel", spy)
    again = synthetic_builder.build(data_config(tmp_path))
    assert again.data_dir != builder.data_dir and parallel_calls == [2]
    assert record_files(again) == record_files(builder) != {}


def test_prepare_reuses_the_dataset_and_tokenizer(prepared, config):
    builder, tok = prepared
    path = tokenizer.tokenizer_path(config, builder)
    assert tok.model_path == path and os.path.isfile(path)
    assert path.startswith(builder.data_dir) and path.endswith("spm_unigram_256.model")
    assert not [n for n in os.listdir(os.path.dirname(path)) if n.startswith(".")]
    stamp = os.stat(path).st_mtime_ns
    builder2, tok2 = pipeline.prepare(config)
    assert os.stat(path).st_mtime_ns == stamp and builder2.data_dir == builder.data_dir
    texts = ["Moderate right pleural effusion."]
    np.testing.assert_array_equal(tok2.encode_batch(texts), tok.encode_batch(texts))


def test_unknown_dataset_name(config):
    with pytest.raises(ValueError, match=r"data.name='mimic_cxr'.*synthetic_cxr"):
        pipeline.prepare(data_config(config.data_dir, name="mimic_cxr"))


def test_batch_keys_shapes_and_dtypes(prepared, config):
    builder, tok = prepared
    expected = {"image": (np.float32, (8, 64, 64, 1)), "tokens": (np.int32, (8, 48)),
                "study_id": (np.int32, (8,)), "text_id": (np.int32, (8,)),
                "labels": (np.float32, (8, NUM_FINDINGS)),
                "labels_present": (np.bool_, (8, NUM_FINDINGS)), "mask": (np.bool_, (8,)),
                "num_skipped": (np.int32, (8,))}
    train = pipeline.make_dataset(config, builder, tok, "train", global_batch_size=8,
                                  train=True, seed=0, process_index=0, process_count=1)
    batch = next(train.as_numpy_iterator())
    assert {k: (v.dtype.type, v.shape) for k, v in batch.items()} == expected
    assert batch["mask"].all() and (batch["study_id"] >= 0).all()
    assert not batch["num_skipped"].any()
    evaluation = eval_batches(config, builder, tok, global_batch_size=8)[0]
    assert set(evaluation) == set(expected) | {"text", "view"}
    assert evaluation["text"].shape == (8,) and evaluation["text"].dtype == object


def test_values_follow_the_spec(prepared, config, studies):
    builder, tok = prepared
    rows = records(builder, "validation")
    batches = eval_batches(config, builder, tok, global_batch_size=len(rows) + 3)
    assert len(batches) == 1
    batch = batches[0]
    for i, record in enumerate(rows):  # Evaluation keeps the records' order.
        pixels = record["image"].astype(np.float32) / 255
        np.testing.assert_allclose(batch["image"][i], (pixels - 0.5) / 0.25, atol=1e-5)
        text = tokenizer.normalize_text(f"{record['findings'].decode()} "
                                        f"{record['impression'].decode()}")
        assert batch["text"][i].decode() == text and batch["view"][i] == record["view"]
        np.testing.assert_array_equal(batch["tokens"][i], tok.encode_batch([text])[0])
        present = ~np.isnan(record["labels"])
        np.testing.assert_array_equal(batch["labels_present"][i], present)
        np.testing.assert_array_equal(batch["labels"][i],
                                      np.where(present, record["labels"], 0))
    real = batch["mask"]
    assert real.sum() == len(rows) and real[: len(rows)].all()
    texts, text_ids = batch["text"][real], batch["text_id"][real]
    study_ids = [r["study_id"] for r in rows]
    for i in range(len(rows)):
        for j in range(len(rows)):
            assert (texts[i] == texts[j]) == (text_ids[i] == text_ids[j])
            assert (study_ids[i] == study_ids[j]) == (
                batch["study_id"][i] == batch["study_id"][j])


def test_resizing_and_text_sources(prepared, config):
    builder, tok = prepared
    small = data_config(config.data_dir, image_size=32, text="impression")
    batch = eval_batches(small, builder, tok)[0]
    assert batch["image"].shape == (4, 32, 32, 1)
    full = eval_batches(config, builder, tok)[0]
    # Downsampling keeps the mean brightness of each image.
    np.testing.assert_allclose(batch["image"].mean(axis=(1, 2, 3)),
                               full["image"].mean(axis=(1, 2, 3)), atol=0.02)
    impressions = [tokenizer.normalize_text(r["impression"].decode())
                   for r in records(builder, "validation")[:4]]
    assert [t.decode() for t in batch["text"]] == impressions
    with pytest.raises(ValueError, match="data.text"):
        eval_batches(data_config(config.data_dir, text="indication"), builder, tok)


def test_eval_padding(prepared, config):
    builder, tok = prepared
    count = builder.info.splits["validation"].num_examples
    batches = eval_batches(config, builder, tok, global_batch_size=4)
    assert len(batches) == -(-count // 4)
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == count and mask[:count].all()
    last = batches[-1]
    padded = ~last["mask"]
    assert not last["image"][padded].any() and not last["tokens"][padded].any()
    assert not last["labels_present"][padded].any() and (last["text"][padded] == b"").all()


def test_two_processes_read_disjoint_halves(prepared, config):
    builder, tok = prepared

    def examples(batches):
        return [(b["study_id"][i], b["view"][i], b["text"][i])
                for b in batches for i in np.flatnonzero(b["mask"])]

    whole = examples(eval_batches(config, builder, tok, global_batch_size=4))
    halves = [eval_batches(config, builder, tok, global_batch_size=4, process_index=i,
                           process_count=2) for i in range(2)]
    assert len(halves[0]) == len(halves[1])  # Lockstep evaluation across hosts.
    assert all(b["image"].shape[0] == 2 for half in halves for b in half)
    first, second = examples(halves[0]), examples(halves[1])
    assert first and second and not set(first) & set(second)
    assert sorted(first + second) == sorted(whole)


def test_train_order_is_a_function_of_the_seed(prepared, config):
    builder, tok = prepared

    def study_ids(seed, batches=12):  # 12 batches of 8 span about 2.4 epochs.
        dataset = pipeline.make_dataset(config, builder, tok, "train", global_batch_size=8,
                                        train=True, seed=seed, process_index=0,
                                        process_count=1)
        return np.concatenate([b["study_id"] for b in dataset.take(batches).as_numpy_iterator()])

    first = study_ids(0)
    np.testing.assert_array_equal(first, study_ids(0))
    assert not np.array_equal(first, study_ids(1))
    epoch = builder.info.splits["train"].num_examples
    assert not np.array_equal(first[:epoch], first[epoch: 2 * epoch])  # Reshuffled.
    assert sorted(first[:epoch]) == sorted(first[epoch: 2 * epoch])  # Each epoch whole.


def test_batch_size_must_split_over_processes(prepared, config):
    builder, tok = prepared
    with pytest.raises(ValueError, match="global_batch_size 9 .* 2 processes"):
        pipeline.make_dataset(config, builder, tok, "train", global_batch_size=9, train=True,
                              seed=0, process_index=0, process_count=2)


def test_image_preprocess_accepts_16_bit(config):
    image = np.linspace(0, 65535, 64 * 64).astype(np.uint16).reshape(64, 64)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    out = pipeline.image_preprocess(tf.constant(buffer.getvalue()), config).numpy()
    np.testing.assert_allclose(out[..., 0], (image / 65535 - 0.5) / 0.25, atol=1e-5)
