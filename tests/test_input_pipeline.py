"""The `synthetic_cxr` TFDS builder and the tf.data pipeline, on a tiny real dataset."""

import io
import os
import socket
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image
from pipeline_reference import warp_from_source

from input_pipeline import pipeline, synthetic_builder, synthetic_cxr, tokenizer
from input_pipeline.augment import AugmentConfig, photometric
from input_pipeline.findings import NUM_FINDINGS
from input_pipeline.stages import pixels
from input_pipeline.stages import text as text_stage
from input_pipeline.stages.source import EpochOrder
from jaxmedclip import batch_schema

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
    version = str(synthetic_builder.SyntheticCxr.VERSION)
    assert builder.data_dir.endswith(os.path.join("synthetic_cxr", "n32-8-8_s64_seed0", version))
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
    # Small tasks send the train split (4 tasks) through two worker processes; the
    # other splits are one task each, done in this process.
    monkeypatch.setattr(synthetic_builder, "_STUDIES_PER_TASK", 8)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    started = []
    popen = subprocess.Popen

    def spy(*args, **kwargs):
        started.append(args[0])
        return popen(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", spy)
    again = synthetic_builder.build(data_config(tmp_path))
    assert again.data_dir != builder.data_dir and len(started) == 2
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
    with pytest.raises(ValueError, match=r"data.name='padchest'.*mimic_cxr.*synthetic_cxr"):
        pipeline.prepare(data_config(config.data_dir, name="padchest"))


def test_registered_builder_needs_its_manual_dir(config):
    with pytest.raises(ValueError, match=r"data.manual_dir is not set.*mimic_cxr"):
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


@pytest.mark.parametrize("image_dtype, top", [
    ("uint16", 65535), pytest.param("uint8", 255, marks=pytest.mark.slow)])
def test_integer_images_carry_the_float_batches_intensities(prepared, config, image_dtype,
                                                             top):
    """data.image_dtype: the same batches (augmented training ones too) with the images as
    scaled integers, which the model normalises on the device."""
    builder, tok = prepared
    augment = dict(crop_scale=(0.7, 1.0), rotation_degrees=5.0, brightness=0.1, gamma=0.1)
    config = data_config(config.data_dir, augment=augment)
    as_int = data_config(config.data_dir, augment=augment, image_dtype=image_dtype)

    def first(cfg, train):
        dataset = pipeline.make_dataset(cfg, builder, tok, "train", global_batch_size=8,
                                        train=train, seed=0, process_index=0, process_count=1)
        return next(dataset.as_numpy_iterator())

    for train in (True, False):
        want, got = first(config, train), first(as_int, train)
        assert got["image"].dtype == np.dtype(image_dtype)
        assert batch_schema.batch_fields(as_int, 8)["image"][1] == np.dtype(image_dtype)
        mean, std = config.image_mean, config.image_std
        np.testing.assert_allclose(batch_schema.intensities(got["image"], mean, std),
                                   batch_schema.intensities(want["image"], mean, std),
                                   atol=0.5 / top + 1e-6)
        np.testing.assert_array_equal(got["tokens"], want["tokens"])


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


def test_text_sections_fall_back_to_the_other_one():
    findings = tf.constant(["Heart is normal.", "", "Small effusion."])
    impression = tf.constant(["No acute process.", "Cardiomegaly.", ""])

    def texts(source):
        return [t.decode() for t in text_stage.select_text(findings, impression, source).numpy()]

    assert texts("report") == texts("both") == [
        "Heart is normal. No acute process.", "Cardiomegaly.", "Small effusion."]
    assert texts("findings") == ["Heart is normal.", "Cardiomegaly.", "Small effusion."]
    assert texts("impression") == ["No acute process.", "Cardiomegaly.", "Small effusion."]


def test_sentences_are_a_seeded_shuffled_subset():
    report = "Heart is normal. No effusion. Lungs are clear! Is it edema? Tube in place."
    sentences = ["Heart is normal.", "No effusion.", "Lungs are clear!", "Is it edema?",
                 "Tube in place."]
    assert [s.decode() for s in text_stage.split_sentences(tf.constant([report]))[0].numpy()] \
        == sentences
    texts = tf.constant([report] * 40 + ["Single sentence.", ""])
    positions = tf.range(42, dtype=tf.int64)

    def choose(**kwargs):
        return [t.decode() for t in text_stage.select_sentences(texts, positions, 0, **kwargs)
                .numpy()]

    two = choose(num_sentences=2)
    assert two == choose(num_sentences=2)  # A function of (seed, position).
    assert two[-2:] == ["Single sentence.", ""]
    def split(text):
        return [p.decode() for p in text_stage.split_sentences(tf.constant([text]))[0].numpy()]

    picked = [tuple(split(t)) for t in two[:40]]
    assert all(len(p) == 2 for p in picked) and len(set(picked)) > 10
    for text in two[:40] + choose()[:40] + choose(sentence_fraction=0.5)[:40]:
        parts = split(text)
        assert set(parts) <= set(sentences) and len(set(parts)) == len(parts)
    assert {len(split(t)) for t in choose(sentence_fraction=0.5)[:40]} == {3}
    assert len({len(split(t)) for t in choose()[:40]}) > 2
    other = [t.decode() for t in text_stage.select_sentences(texts, positions, 1,
                                                            num_sentences=2).numpy()]
    assert other != two
    capped = choose(max_sentences=2)[:40]
    assert {len(split(t)) for t in capped} == {1, 2}
    mixed = choose(max_sentences=1, full_report_prob=0.5)[:40]
    full = [t == report for t in mixed]
    assert 5 < sum(full) < 35  # The rest are single sentences.
    assert all(len(split(t)) == 1 for t, f in zip(mixed, full, strict=True) if not f)
    assert mixed == choose(max_sentences=1, full_report_prob=0.5)[:40]


class BadRecords(tfds.core.GeneratorBasedBuilder):
    """Records in the pipeline's schema (16-bit PNGs, has_report) with broken examples:
    truncated, corrupted and non-PNG images, empty reports, has_report False."""

    VERSION = tfds.core.Version("1.0.0")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        from etils import epath

        return epath.Path(__file__)

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 1), dtype=np.uint16,
                                         encoding_format="png"),
            "view": tfds.features.Text(), "study_id": tfds.features.Text(),
            "patient_id": tfds.features.Text(), "report": tfds.features.Text(),
            "findings": tfds.features.Text(), "impression": tfds.features.Text(),
            "labels": tfds.features.Tensor(shape=(NUM_FINDINGS,), dtype=np.float32),
            "has_report": tfds.features.Scalar(dtype=np.bool_),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(BAD_RECORDS):
            pixels = (np.arange(48 * 40).reshape(48, 40, 1) * (i + 1) * 7).astype(np.uint16)
            buffer = io.BytesIO()
            Image.fromarray(pixels[..., 0]).save(buffer, format="PNG")
            image = buffer.getvalue()
            findings, has_report = f"Finding number {i}.", True
            if i == 3:
                image = image[: len(image) // 2]  # Truncated.
            elif i == 5:
                image = image[:60] + bytes([image[60] ^ 0xFF]) + image[61:]  # Bad CRC.
            elif i == 7:
                image = b"\xff\xd8\xff\xe0 not a png"
            elif i == 9:
                findings = "  "
            elif i == 11:
                has_report = False
            yield i, {"image": image, "view": "PA", "study_id": f"s{i}", "patient_id": "p",
                      "report": findings, "findings": findings,
                      "impression": "" if i == 9 else f"Impression {i}." * (i != 9),
                      "labels": np.full(NUM_FINDINGS, np.nan, np.float32),
                      "has_report": has_report}


BAD_RECORDS = 16
BAD_ROWS = {3, 5, 7, 9, 11}
BAD_IMAGES = {3, 5, 7}


@pytest.fixture(scope="module")
def bad_records(tmp_path_factory, prepared):
    builder = BadRecords(data_dir=str(tmp_path_factory.mktemp("bad")))
    builder.download_and_prepare(file_format="array_record")
    return builder, prepared[1]


def test_png_check():
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(buffer, format="PNG")
    good = buffer.getvalue()
    assert pixels.png_is_intact(good)
    assert not pixels.png_is_intact(good[:-1]) and not pixels.png_is_intact(b"")
    assert not pixels.png_is_intact(good + b"trailing")
    assert not pixels.png_is_intact(good[:20] + bytes([good[20] ^ 0xFF]) + good[21:])


def test_png_size_reads_the_header_without_decoding():
    def png(height, width, dtype):
        return tf.io.encode_png(np.zeros((height, width, 1), dtype)).numpy()

    encoded = [png(5, 7, np.uint8), png(300, 70000 // 256, np.uint16), png(1, 1, np.uint8)]
    height, width = pixels.png_size(tf.constant(encoded + [encoded[0][:12], b""]))
    np.testing.assert_array_equal(height.numpy(), [5, 300, 1, 0, 0])
    np.testing.assert_array_equal(width.numpy(), [7, 70000 // 256, 1, 0, 0])


def test_training_images_are_warped_once_from_the_source(prepared, config):
    # 64-pixel sources to 32-pixel images: each training image is the source warped once
    # (2 x 2 block mean, one bilinear warp), then photometric jitter.
    builder, tok = prepared
    augment = dict(crop_scale=(0.6, 1.0), rotation_degrees=10.0, gamma=0.1, brightness=0.1)
    cfg = data_config(config.data_dir, image_size=32, augment=augment)
    dataset = pipeline.make_dataset(cfg, builder, tok, "train", global_batch_size=8,
                                    train=True, seed=5, process_index=0, process_count=1,
                                    start_step=3)
    batch = next(dataset.as_numpy_iterator())
    positions = np.arange(24, 32)
    source = builder.as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})
    config_ = AugmentConfig.from_config(augment)
    expected = tf.stack([warp_from_source(pixels.decode_png(source[int(r)]["image"]), p, 5,
                                          config_, 32)
                         for r, p in zip(EpochOrder(len(source), 5).records_at(
                             positions), positions, strict=True)])
    expected = photometric(expected, tf.constant(positions), 5, config_).numpy()
    np.testing.assert_allclose(batch["image"], (expected - 0.5) / 0.25, atol=1e-5)
    resized = eval_batches(cfg, builder, tok, split="train", global_batch_size=8)[0]["image"]
    assert np.abs(batch["image"] - resized).mean() > 0.1  # Augmented.


def test_bad_examples_are_masked_and_counted(bad_records, config):
    builder, tok = bad_records
    cfg = data_config(config.data_dir, image_size=16, max_bad_fraction=0.5)
    train = pipeline.make_dataset(cfg, builder, tok, "train", global_batch_size=BAD_RECORDS,
                                  train=True, seed=0, process_index=0, process_count=1)
    source = builder.as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})
    # TFDS stores records in an order of its own: example i is the one with study s{i}.
    example_of_record = np.array([int(source[r]["study_id"][1:]) for r in range(len(source))])
    order = EpochOrder(BAD_RECORDS, 0)
    for step, batch in enumerate(train.take(2).as_numpy_iterator()):
        records = order.records_at(np.arange(BAD_RECORDS) + step * BAD_RECORDS)
        bad = np.isin(example_of_record[records], list(BAD_ROWS))
        np.testing.assert_array_equal(batch["num_skipped"], bad.astype(np.int32))
        np.testing.assert_array_equal(batch["mask"], ~bad)
        assert not batch["image"][bad].any() and not batch["tokens"][bad].any()
        assert batch["image"][~bad].std(axis=(1, 2, 3)).min() > 0.1  # 16-bit decoded.
    # Evaluation keeps empty texts (image-only data is still scored); bad images skipped.
    [evaluation] = eval_batches(cfg, builder, tok, split="train",
                                global_batch_size=BAD_RECORDS)
    bad = np.isin(example_of_record, list(BAD_IMAGES))
    np.testing.assert_array_equal(evaluation["num_skipped"], bad.astype(np.int32))
    np.testing.assert_array_equal(evaluation["mask"], ~bad)
    empty = np.isin(example_of_record, [9, 11])
    assert (evaluation["text"][empty | bad] == b"").all()
    assert (evaluation["text"][~(empty | bad)] != b"").all()


def test_bad_examples_are_skipped_with_augmentation_too(bad_records, config):
    # The warp of each image is computed from its PNG header before decoding: a header
    # that is garbage or missing must not fail the batch.
    builder, tok = bad_records
    cfg = data_config(config.data_dir, image_size=16, max_bad_fraction=0.5,
                      augment=dict(crop_scale=(0.5, 1.0), rotation_degrees=10.0))
    train = pipeline.make_dataset(cfg, builder, tok, "train", global_batch_size=BAD_RECORDS,
                                  train=True, seed=0, process_index=0, process_count=1)
    batch = next(train.as_numpy_iterator())
    assert batch["num_skipped"].sum() == len(BAD_ROWS)
    assert np.isfinite(batch["image"]).all() and not batch["image"][~batch["mask"]].any()


def test_too_many_bad_examples_stop_with_the_count(bad_records, config):
    builder, tok = bad_records
    cfg = data_config(config.data_dir, image_size=16, max_bad_fraction=0.2)
    train = pipeline.make_dataset(cfg, builder, tok, "train", global_batch_size=8,
                                  train=True, seed=0, process_index=0, process_count=1)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"5 of the 16 examples .*data.max_bad_fraction=0.2"):
        list(train.take(4).as_numpy_iterator())


def test_tfrecord_datasets_are_refused_with_a_remedy(tmp_path, prepared):
    builder = BadRecords(data_dir=str(tmp_path))
    builder.download_and_prepare()  # TFRecord, the TFDS default.
    with pytest.raises(ValueError, match="array_record"):
        pipeline.make_dataset(data_config(tmp_path), builder, prepared[1], "train",
                              global_batch_size=4, train=True, seed=0, process_index=0,
                              process_count=1)


def test_library_modules_import_only_the_shared_jaxmedclip_modules():
    # The core and the data side meet only in vocabulary.py, batch_schema.py and
    # config_schema.py (all three import nothing else of the project); the two
    # command-line entry points (build, train_tokenizer) load experiment files in main().
    code = (
        "import importlib, pkgutil, sys, input_pipeline\n"
        "names = [m.name for m in pkgutil.walk_packages(input_pipeline.__path__, "
        "'input_pipeline.')]\n"
        "assert 'input_pipeline.stages.batch' in names, names\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "core = sorted(m for m in sys.modules if m.split('.')[0] == 'jaxmedclip')\n"
        "assert core == ['jaxmedclip', 'jaxmedclip.batch_schema', 'jaxmedclip.config_schema', "
        "'jaxmedclip.vocabulary'], "
        "core\n")
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo_root)
