"""Optimisation recipes: schedules, batch scaling, decay masks, frozen towers, multipliers."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxmedclip import config_lib, models, optim, training

LR = 1e-3
SHALLOW = ("model.image.depth=1", "model.text.depth=1")  # Fewer leaves: faster jit.


def _optim(**fields):
    base = dict(
        name="adamw",
        learning_rate=LR,
        weight_decay=0.0,
        b1=0.9,
        b2=0.98,
        eps=1e-8,
        warmup_steps=10,
        schedule="cosine",
        grad_clip_norm=0.0,
    )
    base.update(fields)
    return ml_collections.ConfigDict(base)


def _model_config(*overrides):
    """The runlocal experiment with a pinned (smaller) model, so the paths below are fixed."""
    config = config_lib.config_from_flags("experiments/tiny_synthetic.py:runlocal", [])
    config.model.embed_dim = 16
    config.model.image.update(width=32, num_heads=2, depth=2, pool="cls")
    config.model.text.update(width=32, num_heads=2, depth=2)
    return config_lib.apply_overrides(config, list(overrides))


def _params(*overrides, abstract=False):
    """The tiny model's (unboxed) parameter tree: shapes only, or random values."""
    config = _model_config(*overrides)
    model = models.build_model(config.model, config.data)
    images, tokens = training.dummy_inputs(config.data)

    def init(rng):
        variables = model.init(rng, jnp.zeros(images.shape), jnp.zeros(tokens.shape, jnp.int32))
        return nn.unbox(variables["params"])

    shapes = jax.eval_shape(init, jax.random.key(0))
    if abstract:
        return shapes
    # Random values of the right shapes: the optimizer does not care how they were drawn.
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)


def _at(tree, path):
    for name in path.split("/"):
        tree = tree[name]
    return tree


def _first_update(tx, params, grads=None):
    grads = jax.tree.map(jnp.ones_like, params) if grads is None else grads
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    return updates


# ----------------------------------------------------------------------------------------
# Schedules.


@pytest.mark.parametrize(
    "name, expected",
    [
        # step:        0,   5 (mid-warmup), 10 (warmup end), 60 (middle), 110 (end)
        ("cosine", [0.0, 0.5, 1.0, 0.5, 0.0]),
        ("linear", [0.0, 0.5, 1.0, 0.5, 0.0]),
        ("rsqrt", [0.0, 0.5, 1.0, math.sqrt(10 / 60), math.sqrt(10 / 110)]),
        ("constant", [0.0, 0.5, 1.0, 1.0, 1.0]),
    ],
)
def test_schedule_values_at_key_steps(name, expected):
    schedule = optim.make_schedule(_optim(schedule=name), total_steps=110)
    got = [float(schedule(step)) for step in (0, 5, 10, 60, 110)]
    np.testing.assert_allclose(got, np.asarray(expected) * LR, rtol=1e-6, atol=1e-12)


def test_rsqrt_timescale_and_cooldown():
    config = _optim(schedule="rsqrt", warmup_steps=10, cooldown_steps=20, rsqrt_timescale=40)
    schedule = optim.make_schedule(config, total_steps=110)
    # lr * sqrt(T / (T + steps after warmup)), times a linear ramp over the last 20 steps.
    rsqrt = lambda step: LR * math.sqrt(40 / (40 + step - 10))
    np.testing.assert_allclose(float(schedule(10)), LR, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(50)), LR * math.sqrt(0.5), rtol=1e-6)
    np.testing.assert_allclose(float(schedule(90)), rsqrt(90), rtol=1e-6)
    np.testing.assert_allclose(float(schedule(100)), 0.5 * rsqrt(100), rtol=1e-6)
    assert float(schedule(110)) == 0.0


def test_constant_with_cooldown_and_no_warmup():
    schedule = optim.make_schedule(
        _optim(schedule="constant", warmup_steps=0, cooldown_steps=10), total_steps=100
    )
    np.testing.assert_allclose(
        [float(schedule(s)) for s in (0, 90, 95, 100)], [LR, LR, LR / 2, 0.0], rtol=1e-6
    )


def test_batch_scaled_learning_rate():
    config = _optim(schedule="constant", base_batch_size=256)
    tx, schedule = optim.make_optimizer(config, 100, global_batch_size=1024)
    assert optim.peak_learning_rate(config, 1024) == pytest.approx(4 * LR)
    np.testing.assert_allclose(float(schedule(10)), 4 * LR, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(5)), 2 * LR, rtol=1e-6)
    # The optimizer uses the scaled rate: AdamW's first update is -lr * sign(grad).
    params = {"w": jnp.zeros((3, 3))}
    update = _first_update(tx, params)["w"]
    np.testing.assert_allclose(update, -float(schedule(0)), rtol=1e-5)
    # Without base_batch_size the batch size does not matter.
    _, plain = optim.make_optimizer(_optim(schedule="constant"), 100, global_batch_size=1024)
    np.testing.assert_allclose(float(plain(10)), LR, rtol=1e-6)


@pytest.mark.parametrize(
    "fields, total, message",
    [
        (dict(name="sgd"), 100, "optim.name='sgd' is unknown; choose one of"),
        (dict(schedule="step"), 100, "optim.schedule='step' is unknown"),
        (dict(warmup_steps=100), 100, "warmup_steps=100 must be smaller"),
        (dict(schedule="rsqrt", cooldown_steps=95), 100, "cooldown_steps=95 must not exceed"),
        (dict(base_batch_size=256), 100, "pass make_optimizer"),
        (dict(layer_decay=1.5), 100, "layer_decay=1.5 must be in"),
        (dict(image_lr_mult=-1.0), 100, "image_lr_mult=-1.0 must be >= 0"),
    ],
)
def test_readable_errors(fields, total, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        optim.make_optimizer(_optim(**fields), total)


# ----------------------------------------------------------------------------------------
# Weight decay mask.


@pytest.mark.parametrize("scan_layers", [False, True])
def test_decay_mask_by_path_on_the_model(scan_layers):
    params = _params(f"model.scan_layers={scan_layers}", "model.image.pool=map", abstract=True)
    block = "blocks" if scan_layers else "block_0"
    mask = optim.decay_mask(params)
    expected = {
        f"image_tower/encoder/{block}/attn/query_kernel": True,
        f"image_tower/encoder/{block}/attn/query_bias": False,  # [heads, kv]: 2-D, a bias.
        f"image_tower/encoder/{block}/attn/out_bias": False,
        f"image_tower/encoder/{block}/mlp/fc1/kernel": True,
        f"image_tower/encoder/{block}/mlp/fc1/bias": False,
        f"image_tower/encoder/{block}/norm1/scale": False,
        f"image_tower/encoder/{block}/norm1/bias": False,
        f"text_tower/encoder/{block}/mlp/fc2/kernel": True,
        "image_tower/encoder/final_norm/scale": False,
        "image_tower/patch_embed/kernel": True,
        "image_tower/patch_embed/bias": False,
        "image_tower/pos_embed": True,
        "image_tower/map_head/probe": True,
        "image_tower/map_head/norm/scale": False,
        "text_tower/token_embed/embedding": True,
        "text_tower/pos_embed": True,
        "image_proj/kernel": True,
        "text_proj/kernel": True,
        "log_scale": False,
        "bias": False,
    }
    for path, decays in expected.items():
        assert _at(mask, path) is decays, path
    no_embed = optim.decay_mask(params, decay_embeddings=False)
    for path in ("image_tower/pos_embed", "text_tower/pos_embed", "image_tower/map_head/probe"):
        assert _at(no_embed, path) is False, path
    assert _at(no_embed, "text_tower/token_embed/embedding") is True
    assert _at(no_embed, "image_tower/patch_embed/kernel") is True


def test_cls_token_follows_decay_embeddings():
    params = _params("model.image.pool=cls", abstract=True)
    assert _at(optim.decay_mask(params), "image_tower/cls") is True
    assert _at(optim.decay_mask(params, decay_embeddings=False), "image_tower/cls") is False


def test_weight_decay_skips_masked_params():
    params = {
        "dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))},
        "log_scale": jnp.asarray(1.0),
    }
    tx, schedule = optim.make_optimizer(_optim(weight_decay=0.5, schedule="constant"), 100)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates = _first_update(tx, params, zeros)
    lr = float(schedule(0))
    np.testing.assert_allclose(updates["dense"]["kernel"], -lr * 0.5, rtol=1e-6)
    assert float(jnp.max(jnp.abs(updates["dense"]["bias"]))) == 0.0
    assert float(updates["log_scale"]) == 0.0


# ----------------------------------------------------------------------------------------
# Frozen towers.


def _leaf_paths(tree):
    return ["/".join(optim.path_names(p)) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_frozen_tower_is_unchanged_and_has_no_state():
    params = _params(*SHALLOW)
    config = _optim(frozen=("image_tower",), weight_decay=0.1, grad_clip_norm=1.0)
    tx, _ = optim.make_optimizer(config, 100)
    state = tx.init(params)
    # No Adam moments for the image tower: no optimizer-state leaf lives under it.
    assert not any("image_tower" in path for path in _leaf_paths(state))
    trainable = [
        x
        for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
        if optim.path_names(p)[0] != "image_tower"
    ]
    state_size = sum(x.size for x in jax.tree.leaves(state))
    assert state_size == 2 * sum(x.size for x in trainable) + 2  # mu, nu; two step counters.

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    rng = np.random.default_rng(1)
    new = params
    for _ in range(3):  # Warmup starts at lr 0: take several steps.
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
        new, state = step(new, state, grads)
    for path, before, after in zip(
        _leaf_paths(params), jax.tree.leaves(params), jax.tree.leaves(new), strict=True
    ):
        if path.startswith("image_tower/"):
            np.testing.assert_array_equal(before, after, err_msg=path)
        else:
            assert not np.array_equal(before, after), path


def test_frozen_path_prefix_freezes_only_that_block():
    params = _params(*SHALLOW)
    tx, _ = optim.make_optimizer(
        _optim(frozen="image_tower/encoder/block_0, text_proj", warmup_steps=0), 100
    )
    updates = _first_update(tx, params)
    for path, update in zip(_leaf_paths(params), jax.tree.leaves(updates), strict=True):
        frozen = path.startswith("image_tower/encoder/block_0/") or path.startswith("text_proj/")
        assert (float(jnp.max(jnp.abs(update))) == 0.0) is frozen, path


def test_frozen_prefix_that_matches_nothing_is_an_error():
    tx, _ = optim.make_optimizer(_optim(frozen=("image_tower/encoder/block_9",)), 100)
    with pytest.raises(ValueError, match="'image_tower/encoder/block_9' matches no parameter"):
        tx.init(_params(abstract=True))


# ----------------------------------------------------------------------------------------
# Per-tower multipliers and layer-wise decay.


def test_per_tower_multipliers_scale_the_updates():
    params = _params(*SHALLOW)
    base_tx, _ = optim.make_optimizer(_optim(warmup_steps=0, weight_decay=0.1), 100)
    tx, _ = optim.make_optimizer(
        _optim(warmup_steps=0, weight_decay=0.1, image_lr_mult=0.5, text_lr_mult=2.0), 100
    )
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
    base, scaled = _first_update(base_tx, params, grads), _first_update(tx, params, grads)
    ratio = {"image_tower": 0.5, "image_proj": 0.5, "text_tower": 2.0, "text_proj": 2.0}
    for path, b, s in zip(
        _leaf_paths(params), jax.tree.leaves(base), jax.tree.leaves(scaled), strict=True
    ):
        np.testing.assert_allclose(s, ratio.get(path.split("/")[0], 1.0) * b, rtol=1e-6)
    assert float(jnp.abs(base["log_scale"])) > 0  # The temperature is trained at lr x 1.


def test_layer_decay_multipliers_unrolled():
    params = _params("model.image.pool=map", abstract=True)  # depth 2 per tower.
    config = _optim(layer_decay=0.5, image_lr_mult=0.1)
    mult = optim.lr_multipliers(params, config)
    expected = {
        "image_tower/patch_embed/kernel": 0.1 * 0.5**3,
        "image_tower/pos_embed": 0.1 * 0.5**3,
        "image_tower/encoder/block_0/mlp/fc1/kernel": 0.1 * 0.5**2,
        "image_tower/encoder/block_1/norm1/scale": 0.1 * 0.5,
        "image_tower/encoder/final_norm/scale": 0.1,
        "image_tower/map_head/probe": 0.1,
        "image_proj/kernel": 0.1,
        "text_tower/token_embed/embedding": 0.5**3,
        "text_tower/pos_embed": 0.5**3,
        "text_tower/encoder/block_0/attn/query_kernel": 0.5**2,
        "text_tower/encoder/block_1/attn/query_kernel": 0.5,
        "text_proj/kernel": 1.0,
        "log_scale": 1.0,
        "bias": 1.0,
    }
    for path, value in expected.items():
        assert _at(mult, path) == pytest.approx(value), path


def test_layer_decay_scales_each_scanned_layer():
    params = _params("model.scan_layers=True", "model.image.depth=3")
    config = _optim(layer_decay=0.5, warmup_steps=0)
    mult = optim.lr_multipliers(params, config)
    np.testing.assert_allclose(
        _at(mult, "image_tower/encoder/blocks/mlp/fc1/kernel"), [0.125, 0.25, 0.5]
    )
    np.testing.assert_allclose(_at(mult, "text_tower/encoder/blocks/norm1/scale"), [0.25, 0.5])
    assert _at(mult, "image_tower/pos_embed") == pytest.approx(0.5**4)
    # AdamW's first update is -lr * m per element: each layer slice gets its own m.
    tx, schedule = optim.make_optimizer(config, 100)
    kernel = _at(_first_update(tx, params), "image_tower/encoder/blocks/mlp/fc1/kernel")
    lr = float(schedule(0))
    for layer, m in enumerate([0.125, 0.25, 0.5]):
        np.testing.assert_allclose(kernel[layer], -lr * m, rtol=1e-5)


# ----------------------------------------------------------------------------------------
# LAMB.


def test_lamb_takes_a_step():
    params = _params()
    config = _optim(name="lamb", warmup_steps=0, weight_decay=0.01, layer_decay=0.8)
    tx, _ = optim.make_optimizer(config, 100)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)
    updates = _first_update(tx, params, grads)
    new = optax.apply_updates(params, updates)
    kernel = "text_tower/encoder/block_0/mlp/fc1/kernel"
    assert np.all(np.isfinite(np.asarray(_at(new, kernel))))
    assert not np.allclose(_at(new, kernel), _at(params, kernel))
    # Trust ratio: the update norm is lr * m * ||w|| for a layer with weights.
    w, u = _at(params, kernel), _at(updates, kernel)
    m = 0.8**2
    np.testing.assert_allclose(
        float(jnp.linalg.norm(u)), LR * m * float(jnp.linalg.norm(w)), rtol=1e-4
    )
