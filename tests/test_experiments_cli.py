"""Every shipped experiment, a few steps through the command a user types
(`python -m jaxmedclip.train`'s `main`): the loss falls, and each method gets its own
inputs (GLoRIA the tokenizer's real word starts, CXR-CLIP the multi-view terms, MedCLIP's
text-only rows per-side masks, the reference recipe the tiled ring)."""

import json
import os

import numpy as np
import pytest

from input_pipeline import pipeline, synthetic_cxr
from input_pipeline.images import encode_png
from jaxmedclip import checkpointing, config_lib, ground, train
from jaxmedclip.methods import local_alignment

SMALL_DATA = [
    "--config.data.synthetic.num_train=256",
    "--config.data.synthetic.num_validation=64",
    "--config.data.synthetic.num_test=64",
    "--config.eval.every_steps=0",
    "--config.log_every=1",
]
# The plain CLIP run also takes the tiled ring loss from the command line (tiles of 3 of
# the 4 examples per device: padded, 2 x 2 tiles per ring block); the others keep their
# files' losses (all_gather, or vit_b16's ring with tiles of 1,024).
TILED = ["--config.loss.impl=ring", "--config.loss.tile_size=3"]
# The CXR-CLIP file's run streams micro-batches of 8 (4 per global batch of 32) from host
# memory (training/stream.py): multi-view GradCache through the command line.
STREAMED = ["--config.microbatch_size=8", "--config.stream_microbatches=True"]
EXPERIMENTS = {
    "clip": "experiments/tiny_synthetic.py:runlocal",
    "quickstart_cxrclip": "experiments/tiny_synthetic.py:runlocal,recipe=cxrclip",
    "medclip_text_only": "experiments/medclip_synthetic.py:runlocal,text_fraction=0.25",
    "gloria": "experiments/gloria_synthetic.py:runlocal",
    "cxrclip": "experiments/cxrclip_synthetic.py:runlocal",
    "vit_b16": "experiments/vit_b16_mimic.py:runlocal",
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """One synthetic dataset and tokenizer for all the experiments (same sizes)."""
    return str(tmp_path_factory.mktemp("tfds"))


def run_main(spec, data_dir, workdir, *flags):
    result = train.main(["--config", spec, "--workdir", workdir,
                         f"--config.data.data_dir={data_dir}", *SMALL_DATA, *flags])
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return result, records


def assert_loss_falls(records):
    losses = [r["loss"] for r in records if "loss" in r]
    assert all(np.isfinite(losses)), losses
    assert np.mean(losses[-4:]) < np.mean(losses[:4]), losses


# The default suite runs tiny_synthetic's default recipe (the Quickstart's: CXR-CLIP's
# multi-view terms and the grounding term) streamed in micro-batches, and GLoRIA's words.
# Slow (run by `pytest -m slow`): cxrclip_synthetic.py (the Quickstart's recipe without
# two settings), the plain runlocal config with the tiled ring loss (the shared trained
# fixture, conftest.tiny_run, runs a smaller runlocal config through main), vit_b16 at
# runlocal size (its config is checked by test_config.py) and MedCLIP (its text-only rows
# and soft targets: test_label_prompts.py, test_methods_training.py).
SLOW = ("clip", "cxrclip", "vit_b16", "medclip_text_only")


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow)
                                  if name in SLOW else name for name in EXPERIMENTS])
def test_experiment_trains_through_main(name, data_dir, tmp_path):
    spec = EXPERIMENTS[name]
    flags = {"clip": TILED, "cxrclip": STREAMED, "quickstart_cxrclip": STREAMED}.get(name, [])
    result, records = run_main(spec, data_dir, str(tmp_path), "--config.total_steps=12", *flags)
    assert [r["step"] for r in records] == list(range(1, 13))
    assert_loss_falls(records)
    config = config_lib.load_config(spec)
    setup, last = result.setup, records[-1]
    for key in ("scale", "learning_rate", "grad_norm", "samples_per_s", "acc_i2t"):
        assert np.isfinite(last[key]), key
    manager = checkpointing.make_manager(str(tmp_path))
    assert manager.latest_step() == 12
    manager.close()
    assert os.path.exists(tmp_path / "config.json") and os.path.exists(tmp_path / "tokenizer.model")
    assert os.listdir(tmp_path / "tensorboard" / "train")
    if name == "gloria":
        # The tokenizer's word starts, not the all-True stand-in of a setup built before
        # the tokenizer existed (what `main` used to train with).
        config.data.data_dir = data_dir
        pieces = pipeline.prepare(config.data)[1].pieces
        want = np.pad(local_alignment.word_start_table(pieces),
                      (0, config.data.vocab_size - len(pieces)))
        assert setup.word_starts_from_tokenizer
        np.testing.assert_array_equal(setup.word_starts, want)
        assert not want.all() and want[:len(pieces)].any()
        assert np.isfinite(last["loss/local"]) and last["loss/local"] > 0
        for r in records:
            np.testing.assert_allclose(
                r["loss"], r["loss/global"] + config.loss.local.weight * r["loss/local"],
                rtol=1e-5)
    elif name in ("quickstart_cxrclip", "cxrclip"):
        weights = config.loss.multiview
        for r in records:
            if name == "quickstart_cxrclip":  # Plus the grounding term (sentence, no words).
                np.testing.assert_allclose(
                    r["loss"], r["loss/global"] + config.loss.local.weight * r["loss/local"],
                    rtol=1e-5)
                r = {**r, "loss": r["loss/global"]}
            np.testing.assert_allclose(
                r["loss"], weights.image_text_weight * r["loss_image_text"]
                + weights.image_image_weight * r["loss_image_image"]
                + weights.text_text_weight * r["loss_text_text"], rtol=1e-5)
            assert r["acc_i2t"] == r["image1_text1/acc_i2t"]
        if name in ("quickstart_cxrclip", "cxrclip"):
            assert setup.train_step.num_micro == 4
        if name == "quickstart_cxrclip":
            # The run's grounding maps through `python -m jaxmedclip.ground`: a phrase's
            # attention over the head's 16 x 16 windows (two branches summed) sums to 1.
            image = tmp_path / "study.png"
            image.write_bytes(encode_png(synthetic_cxr.generate_study(0, "test", 3, 64).images[0]))
            maps = ground.main(["--config", spec, "--workdir", str(tmp_path), "--phrase",
                                "small left pleural effusion.", "--image", str(image),
                                "--out", str(tmp_path / "map.png"),
                                f"--config.data.data_dir={data_dir}"])
            assert maps.shape == (1, 1, 64, 64) and maps.min() >= 0
            np.testing.assert_allclose(maps.mean() * 16 * 16, 1.0, rtol=0.05)
            assert all(r["data_wait_s"] > 0 for r in records)
    elif name == "medclip_text_only":
        assert config.loss.targets == "soft_labels"
        assert config.data.decoupled.text_only_fraction == 0.25
    elif name == "clip":
        with open(tmp_path / "config.json") as f:
            loss = json.load(f)["loss"]
        assert (loss["impl"], loss["tile_size"]) == ("ring", 3)
    elif name == "vit_b16":
        assert config.loss.impl == "ring" and config.loss.tile_size == 1024
    if name != "gloria":
        assert setup.word_starts is None
