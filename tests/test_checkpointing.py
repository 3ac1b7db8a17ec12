"""Checkpoints: items, retention (last K plus best), unreadable-checkpoint fallback."""

import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxmedclip import checkpointing, training


def _state(step: int, value: float = 1.0) -> training.TrainState:
    params = {"w": jnp.full((16, 4), value, jnp.float32), "b": jnp.arange(4.0) * value}
    return training.TrainState(
        step=jnp.asarray(step, jnp.int32), params=params, opt_state={"mu": params}
    )


def _abstract():
    state = _state(0)
    abstract = jax.eval_shape(lambda: state)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return abstract, jax.tree.map(lambda _: sharding, abstract)


def _config(**fields):
    return ml_collections.ConfigDict(dict(seed=0, global_batch_size=32, **fields))


def _save_steps(workdir, steps, policy=None, metrics=None):
    manager = checkpointing.make_manager(str(workdir), policy)
    config = _config()
    for step in steps:
        checkpointing.save(
            manager,
            step,
            _state(step, float(step)),
            data=checkpointing.DataPosition.from_config(config, step),
            config=config,
            metrics=(metrics or {}).get(step),
        )
    manager.wait_until_finished()
    kept = sorted(manager.all_steps())
    manager.close()
    return kept


def test_checkpoint_holds_state_data_position_and_config(tmp_path):
    _save_steps(tmp_path, [3])
    abstract, shardings = _abstract()
    manager = checkpointing.make_manager(str(tmp_path))
    restored = checkpointing.restore_all(manager, abstract, shardings, 3)
    assert int(restored.state.step) == 3
    np.testing.assert_array_equal(restored.state.params["w"], np.full((16, 4), 3.0))
    assert restored.data == checkpointing.DataPosition(step=3, seed=0, global_batch_size=32)
    assert restored.config == {"seed": 0, "global_batch_size": 32}
    # The state-only restore (what evaluate uses) reads the same checkpoint.
    state, step = checkpointing.restore(manager, abstract, shardings)
    assert step == 3 and float(state.params["b"][1]) == 3.0
    manager.close()


def test_data_position_round_trips_and_reads_older_checkpoints():
    position = checkpointing.DataPosition(5, 1, 64)
    assert checkpointing.DataPosition.from_json(position.to_json()) == position
    # Checkpoints of earlier versions also held a "pipeline" dict (never filled).
    older = {"step": 5, "seed": 1, "global_batch_size": 64, "pipeline": {}}
    assert checkpointing.DataPosition.from_json(older) == position


def test_resume_with_another_seed_or_batch_size_is_refused_unless_allowed():
    saved = checkpointing.DataPosition(step=6, seed=0, global_batch_size=32)
    checkpointing.check_data_position(saved, _config())
    bigger = ml_collections.ConfigDict(dict(seed=0, global_batch_size=64))
    with pytest.raises(ValueError, match=r"step 6.*global_batch_size=32 in the checkpoint, 64"):
        checkpointing.check_data_position(saved, bigger)
    other_seed = ml_collections.ConfigDict(dict(seed=1, global_batch_size=32))
    differences = checkpointing.check_data_position(saved, other_seed, allow_change=True)
    assert differences == ["seed=0 in the checkpoint, 1 in the config"]


def test_keeps_the_last_k(tmp_path):
    assert _save_steps(tmp_path, range(1, 7), checkpointing.CheckpointPolicy(keep=2)) == [5, 6]


@pytest.mark.parametrize("mode, best", [("max", 3), ("min", 5)])
def test_keeps_the_best_in_addition_to_the_last_k(tmp_path, mode, best):
    policy = checkpointing.CheckpointPolicy(keep=2, best_metric="eval/auc", best_mode=mode)
    auc = {2: 0.6, 3: 0.9, 4: 0.7, 5: 0.5}  # Steps 1, 6, 7, 8 have no evaluation.
    metrics = {step: {"eval/auc": value} for step, value in auc.items()}
    assert _save_steps(tmp_path, range(1, 9), policy, metrics) == [best, 7, 8]


def test_the_best_survives_a_restart(tmp_path):
    """The metric values are stored with the checkpoints: a resumed run still knows them."""
    policy = checkpointing.CheckpointPolicy(keep=1, best_metric="eval/auc", keep_best=1)
    metrics = {2: {"eval/auc": 0.8}, 4: {"eval/auc": 0.6}}
    assert _save_steps(tmp_path, [2, 4], policy, metrics) == [2, 4]
    metrics = {8: {"eval/auc": 0.7}}
    assert _save_steps(tmp_path, [6, 8, 10], policy, metrics) == [2, 10]


def _damage(step_dir, how):
    files = sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(os.path.join(step_dir, "state"))
        for name in names
    )
    for path in files:
        if how == "truncate":
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
        elif how == "garble" and f"{os.sep}d{os.sep}" in path:
            data = bytearray(open(path, "rb").read())
            data[len(data) // 4 :] = bytes(b ^ 0x5A for b in data[len(data) // 4 :])
            open(path, "wb").write(bytes(data))
        elif how == "delete":
            os.remove(path)


# orbax's reader threads report the failed read once more after it was raised.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("how", ["truncate", "garble", "delete"])
def test_unreadable_latest_falls_back_to_the_previous(tmp_path, caplog, how):
    assert _save_steps(tmp_path, [2, 4, 6]) == [2, 4, 6]
    _damage(tmp_path / "checkpoints" / "6", how)
    abstract, shardings = _abstract()
    manager = checkpointing.make_manager(str(tmp_path))
    with caplog.at_level(logging.INFO, logger="jaxmedclip"):
        restored = checkpointing.restore_latest_readable(manager, abstract, shardings)
    assert restored.step == 4 and int(restored.state.step) == 4
    assert restored.data.step == 4
    assert "checkpoint step 6" in caplog.text and "unreadable" in caplog.text
    assert "resuming from checkpoint step 4" in caplog.text
    # The bad one is moved aside (kept for inspection); the good ones are untouched.
    assert sorted(manager.all_steps()) == [2, 4]
    assert os.listdir(tmp_path / "checkpoints_unreadable") == ["6"]
    # Saving again at step 6 works, and the retention never counts the bad one.
    checkpointing.save(manager, 6, _state(6, 6.0))
    checkpointing.save(manager, 8, _state(8, 8.0))
    manager.wait_until_finished()
    assert sorted(manager.all_steps()) == [4, 6, 8]
    manager.close()


def test_no_readable_checkpoint_is_an_error_and_moves_nothing(tmp_path):
    _save_steps(tmp_path, [2, 4])
    for step in (2, 4):
        _damage(tmp_path / "checkpoints" / str(step), "truncate")
    abstract, shardings = _abstract()
    manager = checkpointing.make_manager(str(tmp_path))
    expected = r"none of the 2 checkpoints.*step 4: .*step 2: "
    with pytest.raises(checkpointing.ResumeError, match=expected):
        checkpointing.restore_latest_readable(manager, abstract, shardings)
    assert sorted(manager.all_steps()) == [2, 4]
    assert not os.path.exists(tmp_path / "checkpoints_unreadable")
    manager.close()


def test_empty_workdir_restores_nothing(tmp_path):
    abstract, shardings = _abstract()
    manager = checkpointing.make_manager(str(tmp_path))
    assert checkpointing.restore_latest_readable(manager, abstract, shardings) is None
    manager.close()


def test_policy_rejects_bad_values():
    with pytest.raises(ValueError, match="checkpoint_keep=0"):
        checkpointing.CheckpointPolicy(keep=0)
    with pytest.raises(ValueError, match="'max' or 'min'"):
        checkpointing.CheckpointPolicy(best_mode="highest")
    policy = checkpointing.CheckpointPolicy.from_config(
        _config(checkpoint_keep=5, checkpoint_best_metric="eval/x", checkpoint_best_mode="min")
    )
    assert policy == checkpointing.CheckpointPolicy(5, "eval/x", "min", 1)
