"""The sharded train step: same numbers on 1 device, 8 devices and (data=4, fsdp=2)."""

import jax
import numpy as np
import pytest

from jaxmedclip import config_lib, models, optim, parallel, trainer


def _batch(config, seed=0):
    rng = np.random.default_rng(seed)
    b, size, length = config.global_batch_size, config.data.image_size, config.data.max_text_len
    tokens = np.zeros((b, length), np.int32)
    for i in range(b):
        n = int(rng.integers(6, length))
        tokens[i, 0] = 2
        tokens[i, 1 : n - 1] = rng.integers(4, config.data.vocab_size, n - 2)
        tokens[i, n - 1] = models.EOS_ID
    return {
        "image": rng.normal(size=(b, size, size, 1)).astype(np.float32),
        "tokens": tokens,
        "mask": np.ones((b,), bool),
    }


def _run(config, devices, steps=3):
    mesh = parallel.make_mesh(config.mesh, devices)
    rules = parallel.logical_rules(config)
    model = models.build_model(config.model, config.data)
    tx, schedule = optim.make_optimizer(config.optim, config.total_steps)
    state, shardings = trainer.create_train_state(model, tx, config.data, mesh, rules, seed=0)
    step = trainer.make_train_step(model, tx, schedule, config.loss, mesh, rules, shardings)
    losses = []
    for i in range(steps):
        state, metrics = step(state, parallel.host_to_global(_batch(config, i), mesh))
        losses.append(float(metrics["loss"]))
    return losses, state


@pytest.fixture(scope="module")
def config():
    return config_lib.config_from_flags(
        "experiments/tiny_synthetic.py:runlocal",
        ["global_batch_size=16", "optim.warmup_steps=1", "optim.learning_rate=3e-3"],
    )


@pytest.fixture(scope="module")
def reference(config):
    return _run(config, jax.devices()[:1])


def test_one_device_equals_eight_devices(config, reference):
    assert len(jax.devices()) == 8
    losses, state = _run(config, jax.devices())
    np.testing.assert_allclose(losses, reference[0], rtol=1e-5)
    assert losses[2] < losses[0]  # The steps do train.
    ref_params = jax.device_get(reference[1].params)
    for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(jax.device_get(state.params)),
                    strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_fsdp_mesh_equals_data_parallel(config, reference):
    fsdp = config_lib.apply_overrides(config, ["mesh.data=4", "mesh.fsdp=2"])
    losses, state = _run(fsdp, jax.devices())
    np.testing.assert_allclose(losses, reference[0], rtol=1e-5)
    # Fully sharded: an MLP kernel's `embed` dimension is split over the 2 fsdp devices.
    kernel = state.params["image_tower"]["encoder"]["block_0"]["mlp"]["fc1"]["kernel"]
    assert kernel.sharding.spec[0] == "fsdp"
    assert kernel.addressable_shards[0].data.shape[0] == kernel.shape[0] // 2
