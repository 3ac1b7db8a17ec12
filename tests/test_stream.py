"""GradCache streamed from host memory (`stream_microbatches`): the same steps as the
un-split global batch, on 8 devices, on 2 processes x 4 devices and with multi-view;
device memory bounded by the feature buffers; exact resume after a preemption that
arrives between micro-batches; clear errors for settings that do not fit."""

import json
import os
import signal
import sys

import jax
import numpy as np
import pytest

from jaxmedclip import checkpointing, config_lib, training
from jaxmedclip.training import stream

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS_DIR)
import stream_setup  # noqa: E402
from two_processes import run_two_processes  # noqa: E402

ATOL = 1e-5


@pytest.fixture(scope="module")
def streamed_clip():
    """(setup, config) of the plain CLIP config streamed in micro-batches of 8."""
    config = stream_setup.small_config(stream=True)
    return training.build(config), config


def _run(config, batches, setup=None):
    """(losses, grad norms, final params) of `config` over `batches` from one init."""
    setup = setup or training.build(config)
    state = training.initial_state(setup, config)
    losses, norms = [], []
    for batch in batches:
        state, metrics = setup.train_step.from_host(state, batch)
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
    return np.array(losses), np.array(norms), jax.device_get(state.params)


def _assert_same_params(a, b):
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    for (path, x), y in zip(flat_a, jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=ATOL, rtol=0,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("method", [
    "clip",
    pytest.param("multiview", marks=pytest.mark.slow),
    pytest.param("gloria", marks=pytest.mark.slow),
    pytest.param("medclip_text_only", marks=pytest.mark.slow),
])
def test_two_streamed_steps_equal_the_unsplit_steps(method, streamed_clip):
    """Global batch 64 in micro-batches of 8 on 8 devices: loss, gradient norm and the
    parameters after 2 AdamW steps match the un-split step; for plain CLIP, CXR-CLIP's
    multi-view terms, GLoRIA's local term and MedCLIP with text-only rows."""
    assert jax.device_count() == 8
    unsplit = stream_setup.small_config(stream=False, micro=None, method=method)
    streamed = stream_setup.small_config(stream=True, method=method)
    batches = stream_setup.host_batches(unsplit)
    want_losses, want_norms, want_params = _run(unsplit, batches)
    setup = streamed_clip[0] if method == "clip" else training.build(streamed)
    losses, norms, params = _run(streamed, batches, setup)
    np.testing.assert_allclose(losses, want_losses, atol=ATOL, rtol=0)
    np.testing.assert_allclose(norms, want_norms, rtol=1e-5)
    _assert_same_params(params, want_params)
    assert setup.train_step.num_micro == 8


@pytest.mark.slow  # .ci/run skips it; `pytest -m slow` runs it.
def test_two_processes_stream_their_own_halves(tmp_path):
    """2 processes x 4 devices, each streaming its half of the batch from its own host
    memory, take the same steps as one process with the un-split batch."""
    out_file = tmp_path / "results.npz"
    run_two_processes(os.path.join(TESTS_DIR, "stream_worker.py"), out_file)
    results = np.load(out_file)
    unsplit = stream_setup.small_config(stream=False, micro=None)
    want_losses, _, want_params = _run(unsplit, stream_setup.host_batches(unsplit))
    np.testing.assert_allclose(results["losses"], want_losses, atol=ATOL, rtol=0)
    for path, want in jax.tree_util.tree_flatten_with_path(want_params)[0]:
        np.testing.assert_allclose(results[jax.tree_util.keystr(path)], np.asarray(want),
                                   atol=ATOL, rtol=0, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow  # .ci/run skips it; `pytest -m slow` runs it.
def test_device_memory_does_not_grow_with_the_number_of_microbatches():
    """M = 4 and M = 32 micro-batches of 8: the embed and backward pieces compile to the
    same temporaries, and what grows is the feature buffers ([local batch, d] each)
    and the loss over them, never the images of the whole batch."""
    reports = {}
    for num_micro in (4, 32):
        config = stream_setup.small_config(
            stream=True, global_batch=8 * num_micro, overrides=["loss.tile_size=2"])
        reports[num_micro] = training.compile_report(config, training.build(config))
    small, large = reports[4], reports[32]
    for piece in ("embed", "backward"):
        assert large[f"{piece}/temp_gib_per_device"] == small[f"{piece}/temp_gib_per_device"]
    growth = large["feature_buffer_gib_per_device"] - small["feature_buffer_gib_per_device"]
    assert growth > 0
    # The embed piece's arguments are the params, one micro-batch and the buffer.
    np.testing.assert_allclose(
        large["embed/argument_gib_per_device"] - small["embed/argument_gib_per_device"],
        growth, rtol=1e-6)
    # The loss piece holds the buffer, its gradient and per-row inputs: linear in the
    # local batch, a few buffers' worth (the images would be 32x32 floats per row).
    image_rows_gib = 8 * 28 * 32 * 32 * 4 / 8 / 1024**3
    loss_growth = large["loss/peak_gib_per_device"] - small["loss/peak_gib_per_device"]
    assert loss_growth < 6 * growth < image_rows_gib, (loss_growth, growth)


def test_a_stop_request_between_microbatches_leaves_the_state_untouched(streamed_clip):
    setup, config = streamed_clip
    state = training.initial_state(setup, config)
    before = jax.device_get(state.params)
    asked = []

    def should_stop():
        asked.append(1)
        return len(asked) == 11  # During pass 2 (8 micro-batches each).

    batch = stream_setup.host_batches(config, steps=1)[0]
    with pytest.raises(stream.StepInterrupted):
        setup.train_step.from_host(state, batch, should_stop)
    _assert_same_params(jax.device_get(state.params), before)
    state, metrics = setup.train_step.from_host(state, batch)  # Still usable.
    assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))


@pytest.mark.parametrize("fields, message", [
    (["stream_microbatches=True", "microbatch_size=None"],
     r"stream_microbatches=True streams micro-batches of microbatch_size .* is None: set "
     r"microbatch_size \(sizes that fit global_batch_size=64 on 8 devices: \[8, 16, 32\]\)"),
    (["stream_microbatches=True", "microbatch_size=24"],
     r"global_batch_size=64 is not divisible by microbatch_size=24; micro-batch sizes that "
     r"fit: \[8, 16, 32, 64\]"),
    (["stream_microbatches=True", "microbatch_size=12"],
     r"microbatch_size=12 is not divisible by the 8 devices"),
])
def test_settings_that_do_not_fit_are_refused_naming_the_fields(fields, message):
    config = stream_setup.small_config(stream=False, overrides=fields)
    with pytest.raises(ValueError, match=message):
        training.build(config)


@pytest.mark.slow
def test_compile_only_reports_each_piece_and_the_feature_buffer(tmp_path, capsys):
    from jaxmedclip import train

    config = os.path.join(stream_setup.REPO, "experiments", "tiny_synthetic.py:runlocal")
    train.main(["--config", config, "--workdir", str(tmp_path), "--compile_only",
                "--config.microbatch_size=8", "--config.stream_microbatches=True"])
    out = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines()
               if ": " in line)
    for piece in ("embed", "loss", "backward", "update"):
        assert float(out[f"{piece}/temp_gib_per_device"]) >= 0, out
    assert 0 < float(out["feature_buffer_gib_per_device"]) < float(out["peak_gib_per_device"])
    assert not os.path.exists(tmp_path / "checkpoints")


# -- through the training loop --------------------------------------------------------

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def _loop_config(data_dir, *overrides):
    return config_lib.config_from_flags(
        os.path.join(stream_setup.REPO, "experiments", "tiny_synthetic.py:runlocal"),
        [f"data.data_dir={data_dir}", "data.synthetic.num_train=256",
         "data.synthetic.num_validation=32", "data.synthetic.num_test=32",
         "total_steps=6", "log_every=1", "optim.warmup_steps=2", "microbatch_size=8",
         "stream_microbatches=True", "model.image.depth=1", "model.text.depth=1",
         *overrides])


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow  # .ci/run skips it; `pytest -m slow` runs it.
def test_preemption_between_microbatches_resumes_exactly(data_dir, tmp_path, monkeypatch):
    """A SIGTERM in the middle of step 4's accumulation saves step 3 and stops; the
    resumed run ends with the losses and parameters of an uninterrupted one."""
    config = _loop_config(data_dir)
    setup = training.build(config)
    full_dir, resumed_dir = str(tmp_path / "full"), str(tmp_path / "resumed")
    training.train(config, full_dir, setup)

    original = stream.StreamedStep._host_chunks
    calls = {"micro": 0}

    def chunks(self, host_batch):
        micro = original(self, host_batch)

        def counted(k):
            calls["micro"] += 1
            # Step 4, pass 1 (4 micro-batches per pass, 2 passes per step).
            if calls["micro"] == 3 * 8 + 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return micro(k)

        return counted

    with monkeypatch.context() as patch:
        patch.setattr(stream.StreamedStep, "_host_chunks", chunks)
        training.train(config, resumed_dir, setup)
    manager = checkpointing.make_manager(resumed_dir)
    assert manager.latest_step() == 3
    manager.close()
    assert [r["step"] for r in _metrics(resumed_dir)] == [1, 2, 3]
    training.train(config, resumed_dir, setup)

    full = {r["step"]: r for r in _metrics(full_dir)}
    resumed = {r["step"]: r for r in _metrics(resumed_dir)}
    assert sorted(resumed) == sorted(full) == list(range(1, 7))
    for step in full:
        np.testing.assert_allclose(resumed[step]["loss"], full[step]["loss"], rtol=1e-5)
        # samples_per_s counts whole global batches; data_wait_s includes both passes' copies.
        assert resumed[step]["data_wait_s"] > 0 and resumed[step]["samples_per_s"] > 0
    states = []
    for workdir in (full_dir, resumed_dir):
        manager = checkpointing.make_manager(workdir)
        states.append(checkpointing.restore(manager, setup.abstract_state, setup.shardings)[0])
        manager.close()
    assert int(states[0].step) == int(states[1].step) == 6
    _assert_same_params(jax.device_get(states[1].params), jax.device_get(states[0].params))
