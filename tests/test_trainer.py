"""The sharded train step: same numbers on 1 device, 8 devices and (data=4, fsdp=2)."""

import jax
import ml_collections
import numpy as np
import pytest

from jaxmedclip import config_lib, models, optim, parallel, training


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
        # Distinct reports: multi-positive targets (the experiment's default) are one-hot.
        "text_id": np.arange(b, dtype=np.int32),
        "study_id": np.arange(b, dtype=np.int32),
    }


def _run(config, devices, steps=3):
    mesh = parallel.make_mesh(config.mesh, devices)
    rules = parallel.logical_rules(config)
    model = models.build_model(config.model, config.data)
    tx, schedule = optim.make_optimizer(config.optim, config.total_steps)
    state, shardings = training.create_train_state(model, tx, config.data, mesh, rules, seed=0)
    step = training.make_train_step(model, tx, schedule, config.loss, mesh, rules, shardings)
    losses = []
    for _ in range(steps):
        # The same batch each step: the loss on it must fall as the model fits it.
        state, metrics = step(state, parallel.host_to_global(_batch(config, 0), mesh))
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


@pytest.mark.slow  # 25 s; sharded == unsharded is checked per loss in test_losses.py.
def test_one_device_equals_eight_devices(config, reference):
    assert len(jax.devices()) == 8
    losses, state = _run(config, jax.devices())
    np.testing.assert_allclose(losses, reference[0], rtol=1e-5)
    assert losses[2] != losses[0]  # The updates change the model (step 1 has lr 0 in warmup).
    ref_params = jax.device_get(reference[1].params)
    for a, b in zip(
        jax.tree.leaves(ref_params), jax.tree.leaves(jax.device_get(state.params)), strict=True
    ):
        np.testing.assert_allclose(a, b, atol=2e-5)


@pytest.mark.slow
def test_fsdp_mesh_equals_data_parallel(config, reference):
    fsdp = config_lib.apply_overrides(config, ["mesh.data=4", "mesh.fsdp=2"])
    losses, state = _run(fsdp, jax.devices())
    np.testing.assert_allclose(losses, reference[0], rtol=1e-5)
    # Fully sharded: an MLP kernel's `embed` dimension is split over the 2 fsdp devices.
    kernel = state.params["image_tower"]["encoder"]["block_0"]["mlp"]["fc1"]["kernel"]
    assert kernel.sharding.spec[0] == "fsdp"
    assert kernel.addressable_shards[0].data.shape[0] == kernel.shape[0] // 2


@pytest.mark.slow
def test_optim_recipes_under_jit_on_an_fsdp_mesh():
    """LAMB, a frozen image tower, layer decay and a text multiplier in the sharded step."""
    config = config_lib.config_from_flags(
        "experiments/tiny_synthetic.py:runlocal", ["mesh.data=4", "mesh.fsdp=2"]
    )
    config.global_batch_size = 16
    config.data.update(image_size=32, max_text_len=16)
    config.model.embed_dim = 32
    config.model.image.update(width=32, num_heads=2, depth=1, pool="cls")
    config.model.text.update(width=32, num_heads=2, depth=2)
    config.loss = ml_collections.ConfigDict(dict(name="softmax", impl="all_gather"))
    config.optim.update(name="lamb", warmup_steps=0)
    config.optim.frozen = ("image_tower",)
    config.optim.layer_decay = 0.8
    config.optim.text_lr_mult = 0.5
    mesh = parallel.make_mesh(config.mesh)
    rules = parallel.logical_rules(config)
    model = models.build_model(config.model, config.data)
    tx, schedule = optim.make_optimizer(config.optim, config.total_steps)
    state, shardings = training.create_train_state(model, tx, config.data, mesh, rules, seed=0)
    opt_paths = [
        jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
    ]
    assert opt_paths and not any("image_tower" in p for p in opt_paths)
    # One sharding per array (what orbax restores into): same structure as the state.
    assert jax.tree.structure(shardings) == jax.tree.structure(state)
    before = jax.device_get(state.params)
    step = training.make_train_step(model, tx, schedule, config.loss, mesh, rules, shardings)
    for i in range(2):
        state, metrics = step(state, parallel.host_to_global(_batch(config, i), mesh))
    assert np.isfinite(float(metrics["loss"]))
    after = jax.device_get(state.params)
    for name in ("image_tower", "image_proj", "text_tower", "text_proj"):
        leaves = zip(jax.tree.leaves(before[name]), jax.tree.leaves(after[name]), strict=True)
        unchanged = all(np.array_equal(a, b) for a, b in leaves)
        assert unchanged is (name == "image_tower"), name
    # Parameters keep their fsdp sharding through the multi-transform update.
    kernel = state.params["text_tower"]["encoder"]["block_0"]["mlp"]["fc1"]["kernel"]
    assert kernel.sharding.spec[0] == "fsdp"


def test_batches_are_prefetched_to_the_devices_in_order(config):
    mesh = parallel.make_mesh(config.mesh, jax.devices())
    pulled = []

    def host_batches():
        for seed in range(5):
            pulled.append(seed)
            yield _batch(config, seed)

    batches = parallel.prefetch_to_device(host_batches(), mesh, depth=2)
    for seed in range(5):
        batch = next(batches)
        # The two batches after the one yielded are already on their way (or all there).
        assert pulled == list(range(min(seed + 3, 5)))
        assert batch["image"].sharding == parallel.batch_sharding(mesh)
        np.testing.assert_array_equal(batch["image"], _batch(config, seed)["image"])
    assert next(batches, None) is None
    with pytest.raises(ValueError, match="depth must be >= 1"):
        next(parallel.prefetch_to_device(host_batches(), mesh, depth=0))
