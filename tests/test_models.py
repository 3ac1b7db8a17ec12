"""Model shapes, dtypes, logical axes, pooling semantics and parameter counts."""

import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmedclip import config_lib, models
from jaxmedclip.models.layers import Encoder


def _tiny(**overrides):
    config = config_lib.config_from_flags(
        "experiments/tiny_synthetic.py:runlocal", [f"{k}={v}" for k, v in overrides.items()]
    )
    return config, models.build_model(config.model, config.data)


def _inputs(config, batch=3, seed=0):
    rng = np.random.default_rng(seed)
    size, length = config.data.image_size, config.data.max_text_len
    images = rng.normal(size=(batch, size, size, 1)).astype(np.float32)
    tokens = np.zeros((batch, length), np.int32)
    for i in range(batch):
        n = 5 + 3 * i
        tokens[i, 0] = 2
        tokens[i, 1 : n - 1] = rng.integers(4, config.data.vocab_size, n - 2)
        tokens[i, n - 1] = models.EOS_ID
    return jnp.asarray(images), jnp.asarray(tokens)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_two_tower_outputs(dtype):
    config, model = _tiny(**{"model.dtype": dtype})
    images, tokens = _inputs(config)
    variables = jax.jit(model.init)(jax.random.key(0), images, tokens)
    out = jax.jit(model.apply)(variables, images, tokens)
    embed = config.model.embed_dim
    assert out["image_emb"].shape == (3, embed) and out["text_emb"].shape == (3, embed)
    assert out["image_emb"].dtype == jnp.float32 and out["text_emb"].dtype == jnp.float32
    np.testing.assert_allclose(jnp.linalg.norm(out["image_emb"], axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(out["text_emb"], axis=-1), 1.0, atol=1e-5)
    assert float(out["scale"]) == pytest.approx(1 / 0.07, rel=1e-5)
    assert float(out["bias"]) == -10.0
    params = flax.core.meta.unbox(variables["params"])
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    _, tokens_out = jax.jit(lambda v, x: model.apply(v, x, method=lambda m, x: m.image_tower(x)))(
        variables, images)
    num_patches = (config.data.image_size // config.model.image.patch_size) ** 2
    assert tokens_out.shape == (3, num_patches, config.model.image.width)
    assert tokens_out.dtype == jnp.dtype(dtype)


def test_scale_is_clamped_at_max():
    config, model = _tiny()
    images, tokens = _inputs(config)
    variables = flax.core.meta.unbox(jax.jit(model.init)(jax.random.key(0), images, tokens))
    variables["params"]["log_scale"] = jnp.asarray(math.log(500.0))
    scale, _ = model.apply(variables, method=lambda m: m.temperature())
    assert float(scale) == pytest.approx(100.0)


def test_every_parameter_has_logical_axes():
    config, model = _tiny(**{"model.image.pool": "map"})
    images, tokens = _inputs(config)
    boxed = jax.eval_shape(model.init, jax.random.key(0), images, tokens)["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves
    for leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), leaf
        assert len(leaf.names) == leaf.value.ndim
    names = {n for leaf in leaves for n in leaf.names}
    assert {"embed", "mlp", "heads", "kv", "vocab"} <= names


@pytest.mark.parametrize("pool", ["cls", "mean", "map"])
def test_vit_pools(pool):
    config, model = _tiny(**{"model.image.pool": pool})
    images, tokens = _inputs(config)
    variables = jax.jit(model.init)(jax.random.key(1), images, tokens)
    emb = jax.jit(lambda v, x: model.apply(v, x, method=lambda m, x: m.encode_image(x)))(
        variables, images)
    assert emb.shape == (3, config.model.embed_dim)
    assert np.isfinite(np.asarray(emb)).all()


def test_causal_text_tower_ignores_later_tokens():
    config, model = _tiny()
    images, tokens = _inputs(config)
    variables = jax.jit(model.init)(jax.random.key(0), images, tokens)
    text_tower = jax.jit(lambda t: model.apply(variables, t, method=lambda m, x: m.text_tower(x)))
    feats = lambda t: text_tower(t)[1]
    changed = tokens.at[2, 9].set(7)  # Example 2 has 11 tokens; position 9 precedes EOS.
    a, b = feats(tokens), feats(changed)
    np.testing.assert_allclose(a[2, :9], b[2, :9], atol=1e-6)  # Earlier positions unchanged.
    assert np.abs(np.asarray(a[2, 9:11] - b[2, 9:11])).max() > 1e-4  # Later ones see it.
    # Pooled at the end-of-text token, which is position n-1 for example i.
    pooled = text_tower(tokens)[0]
    np.testing.assert_allclose(pooled[1], a[1, 7], atol=1e-6)


def test_bidirectional_text_tower_pools_first_token_and_ignores_padding():
    config, model = _tiny(**{"model.text.variant": "bidirectional"})
    images, tokens = _inputs(config)
    variables = jax.jit(model.init)(jax.random.key(0), images, tokens)
    tower = jax.jit(lambda t: model.apply(variables, t, method=lambda m, x: m.text_tower(x)))
    pooled, feats = tower(tokens)
    np.testing.assert_allclose(pooled, feats[:, 0], atol=1e-6)
    changed_last = tokens.at[2, 9].set(7)
    assert np.abs(np.asarray(tower(changed_last)[0][2] - pooled[2])).max() > 1e-4
    # Changing what sits in padded positions of the input id sequence is invisible once the
    # pad mask hides them: compare the same sequence with a longer pad tail.
    short = tokens[:, :20]
    np.testing.assert_allclose(tower(short)[0], pooled, atol=1e-5)


def test_remat_and_scan_compute_the_same_function():
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    plain = Encoder(depth=3, num_heads=2, mlp_dim=32)
    params = jax.jit(plain.init)(jax.random.key(1), x)["params"]
    expected = jax.jit(plain.apply)({"params": params}, x)
    remat = Encoder(depth=3, num_heads=2, mlp_dim=32, remat=True)
    np.testing.assert_allclose(jax.jit(remat.apply)({"params": params}, x), expected, atol=1e-6)
    params = flax.core.meta.unbox(params)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"block_{i}"] for i in range(3)])
    scanned = Encoder(depth=3, num_heads=2, mlp_dim=32, scan_layers=True, remat=True)
    scan_params = {"blocks": stacked, "final_norm": params["final_norm"]}
    np.testing.assert_allclose(jax.jit(scanned.apply)({"params": scan_params}, x), expected,
                               atol=1e-5)


def test_vit_b16_mimic_builds_under_eval_shape():
    config = config_lib.load_config("experiments/vit_b16_mimic.py")
    model = models.build_model(config.model, config.data)
    images = jax.ShapeDtypeStruct((2, 224, 224, 1), jnp.float32)
    tokens = jax.ShapeDtypeStruct((2, config.data.max_text_len), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images, tokens)
    params = flax.core.meta.unbox(variables["params"])
    count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
    image_params = count(params["image_tower"])
    # ViT-B/16: ~86M parameters (85.4M with one input channel and no classifier head).
    assert 85.0e6 < image_params < 86.5e6, image_params
    # 12 layers x 768 wide: scanned blocks stack their parameters on a leading axis.
    assert params["image_tower"]["encoder"]["blocks"]["mlp"]["fc1"]["kernel"].shape == (
        12,
        768,
        3072,
    )
    assert count(params["text_tower"]) > 12 * 12 * 512 * 512  # 12 layers of width 512.
    out = jax.eval_shape(model.apply, variables, images, tokens)
    assert out["image_emb"].shape == (2, 512) and out["text_emb"].shape == (2, 512)


def test_attention_impl_is_checked_and_xla_matches_default():
    config, model = _tiny()
    images, tokens = _inputs(config)
    variables = jax.jit(model.init)(jax.random.key(0), images, tokens)
    _, xla_model = _tiny(**{"model.attention_impl": "'xla'"})
    a, b = jax.jit(model.apply)(variables, images, tokens), jax.jit(xla_model.apply)(
        variables, images, tokens)
    np.testing.assert_allclose(a["text_emb"], b["text_emb"], atol=1e-6)
    with pytest.raises(ValueError, match="model.attention_impl='flash' is unknown"):
        _tiny(**{"model.attention_impl": "'flash'"})
    with pytest.raises(ValueError, match="needs model.dtype bfloat16"):
        _tiny(**{"model.attention_impl": "'cudnn'"})  # tiny: float32
