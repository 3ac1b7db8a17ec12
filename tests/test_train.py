"""End-to-end training on the synthetic data: learning, resume after preemption, NaN stop."""

import json
import logging
import os
import signal

import jax
import numpy as np
import pytest

from jaxmedclip import checkpointing, config_lib, evaluation, flops, train, training

TINY = "experiments/tiny_synthetic.py:runlocal"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def _config(data_dir, *overrides):
    return config_lib.config_from_flags(
        TINY,
        [
            f"data.data_dir={data_dir}",
            "data.synthetic.num_train=256",
            "data.synthetic.num_validation=32",
            "data.synthetic.num_test=32",
            *overrides,
        ],
    )


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# The default run trains every shipped experiment through `main` (test_experiments_cli.py);
# this longer run asserts a larger drop.
@pytest.mark.slow
def test_short_run_on_eight_devices_lowers_the_loss(data_dir, tmp_path):
    assert jax.device_count() == 8
    config = _config(data_dir, "total_steps=100", "log_every=10", "optim.warmup_steps=10")
    training.train(config, str(tmp_path))
    records = _metrics(tmp_path)
    assert [r["step"] for r in records] == [1, *range(10, 101, 10)]
    first = records[0]["loss"]
    last = np.mean([r["loss"] for r in records[-3:]])  # Single batches are noisy.
    # Initial loss is about log(32) = 3.47 (+ the effect of the initial temperature).
    assert 3.0 < first < 5.0
    assert last < 0.85 * first, (first, last)  # 3.80 -> 3.05 when this was written.
    for key in ("scale", "learning_rate", "grad_norm", "samples_per_s", "loss_i2t"):
        assert np.isfinite(records[-1][key])
    manager = checkpointing.make_manager(str(tmp_path))
    assert manager.latest_step() == 100
    assert os.path.exists(tmp_path / "config.json")
    assert os.listdir(tmp_path / "tensorboard" / "train")


def _interrupt_after(monkeypatch, step_to_stop):
    original = training.metrics.MetricsWriter.write

    def write(self, step, metrics):
        original(self, step, metrics)
        if step == step_to_stop:
            os.kill(os.getpid(), signal.SIGTERM)  # Preemption notice mid-run.

    monkeypatch.setattr(training.metrics.MetricsWriter, "write", write)


def test_preempted_run_resumes_exactly(data_dir, tmp_path, monkeypatch):
    overrides = ("total_steps=12", "log_every=2", "optim.warmup_steps=2")
    full_dir, resumed_dir = str(tmp_path / "full"), str(tmp_path / "resumed")
    config = _config(data_dir, *overrides)
    setup = training.build(config)  # One setup, so the step compiles once for the 3 runs.
    training.train(config, full_dir, setup)

    with monkeypatch.context() as patch:
        _interrupt_after(patch, 6)
        training.train(config, resumed_dir, setup)
    manager = checkpointing.make_manager(resumed_dir)
    assert manager.latest_step() == 6  # Saved at the step where the signal arrived.
    manager.close()
    training.train(config, resumed_dir, setup)  # Picks up from step 6.

    full, resumed = _metrics(full_dir), _metrics(resumed_dir)
    full_losses = {r["step"]: r["loss"] for r in full}
    resumed_losses = {r["step"]: r["loss"] for r in resumed}
    assert sorted(resumed_losses) == sorted(set(full_losses) | {7})  # Step 7: first after resume.
    for step, loss in full_losses.items():
        np.testing.assert_allclose(resumed_losses[step], loss, rtol=1e-5, err_msg=f"step {step}")

    states = []
    for workdir in (full_dir, resumed_dir):
        manager = checkpointing.make_manager(workdir)
        states.append(checkpointing.restore(manager, setup.abstract_state, setup.shardings)[0])
        manager.close()
    assert int(states[0].step) == int(states[1].step) == 12
    for a, b in zip(
        jax.tree.leaves(states[0].params), jax.tree.leaves(states[1].params), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_non_finite_step_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path):
    config = _config(data_dir, "total_steps=8", "log_every=4", "checkpoint_every=2")
    setup = training.build(config)
    step_fn = setup.train_step

    def poisoned(state, batch):
        state, metrics = step_fn(state, batch)
        if int(state.step) >= 3:
            metrics = dict(metrics, loss=metrics["loss"] * np.nan)
        return state, metrics

    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 4.*is step 2"):
        training.train(config, str(tmp_path), setup._replace(train_step=poisoned))
    manager = checkpointing.make_manager(str(tmp_path))
    assert manager.latest_step() == 2
    state, _ = checkpointing.restore(manager, setup.abstract_state, setup.shardings)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def _final_params(workdir, config):
    setup = training.build(config)
    manager = checkpointing.make_manager(str(workdir))
    state, step = checkpointing.restore(manager, setup.abstract_state, setup.shardings)
    manager.close()
    return step, [np.asarray(x) for x in jax.tree.leaves(state.params)]


def _losses(workdir):
    return {r["step"]: r["loss"] for r in _metrics(workdir) if "loss" in r}


@pytest.mark.slow
def test_data_fsdp_mesh_trains_like_data_parallel(data_dir, tmp_path):
    """(data=4, fsdp=2) and (data=8) in one process: same losses and parameters.

    Tolerance: losses rtol 1e-5, parameters atol 1e-5 after 6 AdamW steps (float32; the
    two layouts only change the order of the gradient reductions).
    """
    overrides = ("total_steps=6", "log_every=1", "optim.warmup_steps=2")
    runs = {}
    for name, mesh in (
        ("data8", ("mesh.data=8",)),
        ("data4_fsdp2", ("mesh.data=4", "mesh.fsdp=2")),
    ):
        config = _config(data_dir, *overrides, *mesh)
        training.train(config, str(tmp_path / name))
        runs[name] = (_losses(tmp_path / name), _final_params(tmp_path / name, config))
    (losses_a, (step_a, params_a)), (losses_b, (step_b, params_b)) = runs.values()
    assert sorted(losses_a) == sorted(losses_b) == list(range(1, 7))
    np.testing.assert_allclose(
        [losses_b[s] for s in range(1, 7)], [losses_a[s] for s in range(1, 7)], rtol=1e-5
    )
    assert step_a == step_b == 6
    for a, b in zip(params_a, params_b, strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5)


def _damage_checkpoint(step_dir):
    for root, _, names in os.walk(os.path.join(step_dir, "state")):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)


@pytest.mark.slow  # tests/test_checkpointing.py covers the fallback itself in seconds.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupted_latest_checkpoint_falls_back_and_changed_batch_is_refused(
    data_dir, tmp_path, caplog
):
    overrides = ("log_every=1", "checkpoint_every=2", "optim.warmup_steps=2")
    workdir = str(tmp_path)
    training.train(_config(data_dir, "total_steps=6", *overrides), workdir)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4", "6"]
    _damage_checkpoint(tmp_path / "checkpoints" / "6")

    with caplog.at_level(logging.INFO, logger="jaxmedclip"):
        training.train(_config(data_dir, "total_steps=8", *overrides), workdir)
    assert "checkpoint step 6" in caplog.text and "unreadable" in caplog.text
    assert "resuming from checkpoint step 4" in caplog.text
    steps = [r["step"] for r in _metrics(workdir)]
    assert steps == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8]  # Steps 5 and 6 again, from step 4.
    # The damaged step is kept aside; retention counted only readable checkpoints.
    assert os.listdir(tmp_path / "checkpoints_unreadable") == ["6"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "6", "8"]

    config = _config(data_dir, "total_steps=10", "global_batch_size=64", *overrides)
    with pytest.raises(checkpointing.ResumeError, match="global_batch_size=32 in the checkpoint"):
        training.train(config, workdir)


@pytest.mark.slow
def test_best_checkpoint_is_kept_besides_the_last(data_dir, tmp_path, monkeypatch):
    auc = {2: 0.61, 4: 0.83, 6: 0.72, 8: 0.70}
    calls = []

    def evaluate(
        config, model, params, mesh, builder, tokenizer, split, workdir, *, step, prefix, embedder
    ):
        calls.append(step)
        return {f"{prefix}zero_shot_mean_auc": auc[step]}

    monkeypatch.setattr(evaluation, "evaluate", evaluate)
    config = _config(data_dir, "total_steps=8", "log_every=4", "eval.every_steps=2")
    config.checkpoint_keep = 1
    config.checkpoint_best_metric = "eval/zero_shot_mean_auc"
    training.train(config, str(tmp_path))
    assert calls == [2, 4, 6, 8]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "8"]
    manager = checkpointing.make_manager(
        str(tmp_path), checkpointing.CheckpointPolicy.from_config(config)
    )
    assert manager.best_step() == 4
    manager.close()


def _restore_logging():
    logger = logging.getLogger("jaxmedclip")
    saved = (list(logger.handlers), logger.level, logger.propagate)

    def restore():
        logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]

    return restore


@pytest.mark.parametrize(
    "spec",
    [
        TINY,
        # The real recipe (ViT-B/16 at 224, 12-layer text tower, global batch 4096), unchanged
        # but for the mesh: ~35 s to compile on an idle 2-core CPU.
        pytest.param("experiments/vit_b16_mimic.py", marks=pytest.mark.slow),
    ],
)
def test_compile_only_prints_memory_and_flops_without_data(spec, tmp_path, capsys):
    restore = _restore_logging()
    try:
        train.main(
            ["--config", spec, "--workdir", str(tmp_path), "--compile_only", "--config.mesh.data=8"]
        )
    finally:
        restore()
    out = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines() if ": " in line)
    assert out["mesh"] == "data=8 fsdp=1 tensor=1"
    for key in (
        "argument_gib_per_device",
        "temp_gib_per_device",
        "output_gib_per_device",
        "peak_gib_per_device",
        "model_tflops_per_device",
        "xla_tflops_per_device",
    ):
        assert float(out[key]) > 0, key
    config = config_lib.config_from_flags(spec, ["mesh.data=8"])
    expected = flops.train_flops_per_step(config) / 8 / 1e12
    np.testing.assert_allclose(float(out["model_tflops_per_device"]), expected, rtol=1e-3)
    assert not os.listdir(tmp_path)  # Nothing written, no dataset needed.
