"""Decoupled examples (`data.decoupled`, input_pipeline/label_prompts.py): a fixed share
of every global batch reads the record's labels written as text, another fixed share are
reports without their image (`image_mask` False); label-only records take their prompt
instead of being skipped; order and resume stay exact."""

import io

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from input_pipeline import label_prompts, labeler, pipeline, tokenizer
from input_pipeline.findings import NUM_FINDINGS
from input_pipeline.stages.source import EpochOrder
from jaxmedclip import config_lib, training

GLOBAL_BATCH = 8


def data_config(data_dir, **overrides):
    return ml_collections.ConfigDict({**dict(
        name="synthetic_cxr", data_dir=str(data_dir),
        synthetic=dict(num_train=24, num_validation=4, num_test=4, source_image_size=32,
                       seed=0),
        image_size=32, image_mean=0.5, image_std=0.25, text="report", max_text_len=48,
        vocab_size=256, tokenizer_type="unigram",
        decoupled=dict(label_prompt_fraction=0.25)), **overrides})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def config(data_dir):
    return data_config(data_dir)


@pytest.fixture(scope="module")
def prepared(config):
    return pipeline.prepare(config)


def batches(config, builder, tok, count, *, start_step=0, process_index=0, process_count=1,
            train=True, split="train"):
    dataset = pipeline.make_dataset(config, builder, tok, split,
                                    global_batch_size=GLOBAL_BATCH, train=train, seed=0,
                                    process_index=process_index,
                                    process_count=process_count, start_step=start_step)
    return list(dataset.take(count).as_numpy_iterator())


def record_labels(builder, split="train"):
    """float [N, 14] (NaN blank): every record's labels, in stored order."""
    source = builder.as_data_source(split=split)
    return np.stack([source[i]["labels"] for i in range(len(source))])


def expected_prompts(labels, positions, tok):
    texts = [labeler.labels_to_prompt(row, np.random.default_rng(
        [0, label_prompts.SALT_PROMPT_TEXT, 0, int(p)])) for row, p in zip(
        labels, positions, strict=True)]
    return tok.encode_batch([tokenizer.normalize_text(t) for t in texts])


def test_a_fixed_share_of_each_batch_reads_its_labels_as_text(data_dir, config, prepared):
    builder, tok = prepared
    steps = 6
    got = batches(config, builder, tok, steps)
    plain = batches(data_config(data_dir, decoupled=None), builder, tok, steps)
    labels = record_labels(builder)
    order = EpochOrder(len(labels), 0)
    slots = []
    for step, (batch, reference) in enumerate(zip(got, plain, strict=True)):
        prompt = batch["label_prompt"]
        assert prompt.dtype == np.bool_ and prompt.shape == (GLOBAL_BATCH,)
        assert prompt.sum() == round(0.25 * GLOBAL_BATCH) and batch["mask"].all()
        slots.append(tuple(np.flatnonzero(prompt)))
        positions = step * GLOBAL_BATCH + np.arange(GLOBAL_BATCH)
        records = order.records_at(positions)
        np.testing.assert_array_equal(
            batch["tokens"][prompt],
            expected_prompts(labels[records[prompt]], positions[prompt], tok))
        assert not (batch["tokens"][prompt] == reference["tokens"][prompt]).all(axis=1).any()
        # The other rows, and every image and label, are the plain batch's.
        assert set(batch) - set(reference) == {"label_prompt", "image_mask", "text_mask"}
        assert batch["image_mask"].all() and batch["text_mask"].all()  # No text-only rows.
        for key, value in reference.items():
            rows = ~prompt if key in ("tokens", "text_id") else slice(None)
            np.testing.assert_array_equal(batch[key][rows], value[rows], err_msg=key)
    assert len(set(slots)) > 1  # The prompt rows move around the batch.


@pytest.mark.parametrize("decoupled", [
    dict(label_prompt_fraction=0.25),
    dict(label_prompt_fraction=0.25, text_only_fraction=0.375),
])
def test_decoupled_rows_stay_exact_on_resume_and_across_processes(data_dir, prepared,
                                                                  decoupled):
    builder, tok = prepared
    config = data_config(data_dir, decoupled=decoupled)
    whole = batches(config, builder, tok, 4)
    text_only = sum(int((~b["image_mask"]).sum()) for b in whole)
    assert text_only == 4 * round(decoupled.get("text_only_fraction", 0) * GLOBAL_BATCH)
    resumed = batches(config, builder, tok, 2, start_step=2)
    halves = [batches(config, builder, tok, 4, process_index=p, process_count=2)
              for p in (0, 1)]
    for step, batch in enumerate(whole):
        for key, value in batch.items():
            if step >= 2:
                np.testing.assert_array_equal(resumed[step - 2][key], value, err_msg=key)
            joined = np.concatenate([h[step][key] for h in halves])
            np.testing.assert_array_equal(joined, value, err_msg=f"{key} at step {step}")


def test_evaluation_ignores_it(data_dir, config, prepared):
    builder, tok = prepared
    got = batches(config, builder, tok, 1, train=False, split="validation")[0]
    plain = batches(data_config(data_dir, decoupled=None), builder, tok, 1, train=False,
                    split="validation")[0]
    assert got.keys() == plain.keys()
    for key, value in plain.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


@pytest.mark.parametrize("decoupled, message", [
    (dict(text_only_fraction=-0.1), r"text_only_fraction=-0.1 outside \[0, 1\]"),
    (dict(label_prompt_fraction=0.75, text_only_fraction=0.5),
     r"label_prompt_fraction=0.75 plus text_only_fraction=0.5 .* sum must be at most 1"),
    (dict(label_prompt_fraction=1.5), r"label_prompt_fraction=1.5 outside \[0, 1\]"),
    (dict(image_only_fraction=0.25), r"image_only_fraction is now called label_prompt_fraction"),
    (dict(image_fraction=0.5), r"data.decoupled.image_fraction is not a config field"),
])
def test_bad_settings_are_refused(data_dir, prepared, decoupled, message):
    builder, tok = prepared
    with pytest.raises(ValueError, match=message):
        batches(data_config(data_dir, decoupled=decoupled), builder, tok, 1)


def test_text_label_rows_are_reports_without_their_image(data_dir, config, prepared):
    """Both fractions at 0.25: per global batch of 8, exactly 2 prompt rows, 2 text-only
    rows and 4 paired ones, ranked by one draw."""
    builder, tok = prepared
    steps = 6
    both = data_config(data_dir, decoupled=dict(label_prompt_fraction=0.25,
                                                text_only_fraction=0.25))
    got = batches(both, builder, tok, steps)
    prompts_only = batches(config, builder, tok, steps)
    half = batches(data_config(data_dir, decoupled=dict(label_prompt_fraction=0.5)), builder,
                   tok, steps)
    plain = batches(data_config(data_dir, decoupled=None), builder, tok, steps)
    labels = np.nan_to_num(record_labels(builder))
    order = EpochOrder(len(labels), 0)
    slots = []
    for step, batch in enumerate(got):
        records = order.records_at(step * GLOBAL_BATCH + np.arange(GLOBAL_BATCH))
        assert labels[records].any(axis=1).all()  # Every row could be a text-label row.
        prompt, text_only = batch["label_prompt"], ~batch["image_mask"]
        for key in ("image_mask", "text_mask"):
            assert batch[key].dtype == np.bool_ and batch[key].shape == (GLOBAL_BATCH,)
        assert batch["mask"].all() and batch["text_mask"].all()
        assert prompt.sum() == 2 and text_only.sum() == 2 and not (prompt & text_only).any()
        assert (~prompt & ~text_only).sum() == 4
        # The two lowest draws are the prompt rows, the next two the text-only rows.
        np.testing.assert_array_equal(prompt, prompts_only[step]["label_prompt"])
        np.testing.assert_array_equal(prompt | text_only, half[step]["label_prompt"])
        np.testing.assert_array_equal(batch["tokens"], prompts_only[step]["tokens"])
        # A text-only row keeps its report and its (decoded) image; the loss masks it.
        for key, value in plain[step].items():
            rows = ~prompt if key in ("tokens", "text_id") else slice(None)
            np.testing.assert_array_equal(batch[key][rows], value[rows], err_msg=key)
        assert batch["image"][text_only].any(axis=(1, 2, 3)).all()
        slots.append(tuple(np.flatnonzero(text_only)))
    assert len(set(slots)) > 1  # The text-only rows move around the batch.


def test_text_only_refusals(data_dir):
    decoupled = dict(text_only_fraction=0.25)
    with pytest.raises(ValueError, match=r"text_only_fraction=0.25 with data.multiview"):
        label_prompts.DecoupledData.from_config(
            ml_collections.ConfigDict(dict(multiview=True, decoupled=decoupled)))
    config = config_lib.load_config("experiments/medclip_synthetic.py:runlocal,"
                                    "text_fraction=0.25")
    assert config.data.decoupled.text_only_fraction == 0.25
    training.check_config(config)
    for targets in ("one_hot", "multi_positive"):
        other = config_lib.apply_overrides(config, [f"loss.targets={targets}"])
        with pytest.raises(ValueError, match=rf"text_only_fraction=0.25 needs loss.targets="
                                             rf"'soft_labels'.*loss.targets='{targets}'"):
            training.check_config(other)
    local = ml_collections.ConfigDict(config.to_dict())
    local.loss.local = ml_collections.ConfigDict(dict(weight=1.0))
    with pytest.raises(ValueError, match=r"text_only_fraction=0.25 with loss.local"):
        training.check_config(local)
    local.loss.local.weight = 0.0  # The local term switched off: fine.
    training.check_config(local)


class LabelOnly(tfds.core.GeneratorBasedBuilder):
    """Eight records in the pipeline's schema; the odd ones have labels but no report
    (`has_report` False, like CheXpert), record 7 not even labels."""

    VERSION = tfds.core.Version("1.0.0")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        from etils import epath

        return epath.Path(__file__)

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 1), dtype=np.uint8,
                                         encoding_format="png"),
            "view": tfds.features.Text(), "study_id": tfds.features.Text(),
            "findings": tfds.features.Text(), "impression": tfds.features.Text(),
            "labels": tfds.features.Tensor(shape=(NUM_FINDINGS,), dtype=np.float32),
            "has_report": tfds.features.Scalar(dtype=np.bool_),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _labels_and_report(self, i):
        """(labels [14], NaN blank; has_report) of record i."""
        labels = np.full(NUM_FINDINGS, np.nan, np.float32)
        if i != 7:
            labels[i] = 1.0
        return labels, i % 2 == 0

    def _generate_examples(self):
        for i in range(8):
            buffer = io.BytesIO()
            Image.fromarray(np.full((16, 16), 20 * i, np.uint8)).save(buffer, format="PNG")
            labels, has_report = self._labels_and_report(i)
            yield i, {"image": buffer.getvalue(), "view": "PA", "study_id": f"s{i}",
                      "findings": f"Finding number {i}." if has_report else "",
                      "impression": "", "labels": labels, "has_report": has_report}


def test_label_only_records_take_their_prompt(tmp_path, data_dir, prepared):
    _, tok = prepared
    builder = LabelOnly(data_dir=str(tmp_path))
    builder.download_and_prepare(file_format="array_record")
    config = data_config(data_dir, image_size=16, max_bad_fraction=0.5,
                         decoupled=dict(label_prompt_fraction=0.0))
    [batch] = batches(config, builder, tok, 1)
    source = builder.as_data_source("train")
    records = EpochOrder(len(source), 0).records_at(np.arange(GLOBAL_BATCH))
    example = np.array([int(source[int(r)]["study_id"][1:]) for r in records])
    label_only = example % 2 == 1
    np.testing.assert_array_equal(batch["label_prompt"], label_only & (example != 7))
    np.testing.assert_array_equal(batch["mask"], example != 7)  # No labels: no prompt.
    prompted = batch["label_prompt"]
    labels = np.stack([source[int(r)]["labels"] for r in records])
    np.testing.assert_array_equal(
        batch["tokens"][prompted],
        expected_prompts(labels[prompted], np.arange(GLOBAL_BATCH)[prompted], tok))
    # Without data.decoupled these records have no text and are skipped.
    [plain] = batches(data_config(data_dir, image_size=16, max_bad_fraction=0.6,
                                  decoupled=None), builder, tok, 1)
    np.testing.assert_array_equal(plain["mask"], ~label_only)
    assert not plain["tokens"][label_only].any()


class TextOnlyCases(LabelOnly):
    """Eight records that test which chosen rows can lose their image: 0 has a report
    but all labels blank, 1 only negative mentions (0), 5 and 7 labels but no report;
    2, 3, 4, 6 a report and a positive or uncertain label."""

    def _labels_and_report(self, i):
        labels = np.full(NUM_FINDINGS, np.nan, np.float32)
        labels[i] = {0: np.nan, 1: 0.0, 6: -1.0}.get(i, 1.0)
        return labels, i not in (5, 7)


def test_rows_the_loss_cannot_use_without_their_image_keep_it(tmp_path, data_dir, prepared):
    _, tok = prepared
    builder = TextOnlyCases(data_dir=str(tmp_path))
    builder.download_and_prepare(file_format="array_record")
    config = data_config(data_dir, image_size=16, decoupled=dict(text_only_fraction=1.0))
    [batch] = batches(config, builder, tok, 1)
    source = builder.as_data_source("train")
    records = EpochOrder(len(source), 0).records_at(np.arange(GLOBAL_BATCH))
    example = np.array([int(source[int(r)]["study_id"][1:]) for r in records])
    assert batch["mask"].all() and batch["text_mask"].all()
    # Every row was chosen; only reports with a non-zero label row lose their image.
    np.testing.assert_array_equal(~batch["image_mask"], np.isin(example, [2, 3, 4, 6]))
    np.testing.assert_array_equal(batch["label_prompt"], np.isin(example, [5, 7]))
