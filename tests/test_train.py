"""End-to-end training on the synthetic data: learning, resume after preemption, NaN stop."""

import json
import os
import signal

import jax
import numpy as np
import pytest

from jaxmedclip import checkpointing, config_lib, train

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


def test_short_run_on_eight_devices_lowers_the_loss(data_dir, tmp_path):
    assert jax.device_count() == 8
    config = _config(data_dir, "total_steps=100", "log_every=10", "optim.warmup_steps=10")
    train.train(config, str(tmp_path))
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
    original = train.MetricsWriter.write

    def write(self, step, metrics):
        original(self, step, metrics)
        if step == step_to_stop:
            os.kill(os.getpid(), signal.SIGTERM)  # Preemption notice mid-run.

    monkeypatch.setattr(train.MetricsWriter, "write", write)


def test_preempted_run_resumes_exactly(data_dir, tmp_path, monkeypatch):
    overrides = ("total_steps=12", "log_every=2", "optim.warmup_steps=2")
    full_dir, resumed_dir = str(tmp_path / "full"), str(tmp_path / "resumed")
    train.train(_config(data_dir, *overrides), full_dir)

    with monkeypatch.context() as patch:
        _interrupt_after(patch, 6)
        train.train(_config(data_dir, *overrides), resumed_dir)
    manager = checkpointing.make_manager(resumed_dir)
    assert manager.latest_step() == 6  # Saved at the step where the signal arrived.
    manager.close()
    train.train(_config(data_dir, *overrides), resumed_dir)  # Picks up from step 6.

    full, resumed = _metrics(full_dir), _metrics(resumed_dir)
    full_losses = {r["step"]: r["loss"] for r in full}
    resumed_losses = {r["step"]: r["loss"] for r in resumed}
    assert sorted(resumed_losses) == sorted(set(full_losses) | {7})  # Step 7: first after resume.
    for step, loss in full_losses.items():
        np.testing.assert_allclose(resumed_losses[step], loss, rtol=1e-5, err_msg=f"step {step}")

    setup = train.build(_config(data_dir, *overrides))
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
    setup = train.build(config)
    step_fn = setup.train_step

    def poisoned(state, batch):
        state, metrics = step_fn(state, batch)
        if int(state.step) >= 3:
            metrics = dict(metrics, loss=metrics["loss"] * np.nan)
        return state, metrics

    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 4.*is step 2"):
        train.train(config, str(tmp_path), setup._replace(train_step=poisoned))
    manager = checkpointing.make_manager(str(tmp_path))
    assert manager.latest_step() == 2
    state, _ = checkpointing.restore(manager, setup.abstract_state, setup.shardings)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
