"""The throughput options of the towers compute the same function as the plain ones:
attention padded to even lengths (what cuDNN's fused kernels need), rematerialisation
policies and partly unrolled scans, the patch embedding as a matmul, fused q/k/v, and
integer images normalised on the device."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmedclip import batch_schema, config_lib, models, training
from jaxmedclip.models.layers import Attention, Encoder, padded_attention
from jaxmedclip.models.vit import PatchEmbed, normalize_pixels


def _qkv(batch=3, length=7, heads=2, dim=8, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(k, (batch, length, heads, dim)) for k in keys]


@pytest.mark.parametrize("causal, pad_multiple", [(False, 2), (True, 8)])
def test_padded_attention_equals_unpadded_forward_and_gradients(causal, pad_multiple):
    q, k, v = _qkv(length=7)
    lengths = None if not causal else jnp.array([7, 4, 1], jnp.int32)  # Text: padded rows.

    def loss(q, k, v, multiple):
        out = padded_attention(q, k, v, is_causal=causal, kv_lengths=lengths,
                               implementation="xla", pad_multiple=multiple)
        weights = jnp.arange(out.size, dtype=out.dtype).reshape(out.shape) / out.size
        return jnp.sum(jnp.sin(out) * weights), out

    grad = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True), static_argnums=3)
    (ref_loss, ref_out), ref_grads = grad(q, k, v, 1)
    (pad_loss, pad_out), pad_grads = grad(q, k, v, pad_multiple)
    assert pad_out.shape == ref_out.shape == q.shape
    np.testing.assert_allclose(pad_out, ref_out, atol=1e-6)
    np.testing.assert_allclose(pad_loss, ref_loss, atol=1e-6)
    for got, want in zip(pad_grads, ref_grads, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_padded_cross_attention_of_a_single_query():
    q, _, _ = _qkv(length=1, seed=1)
    _, k, v = _qkv(length=197, seed=2)
    attend = jax.jit(lambda q, k, v, multiple: padded_attention(
        q, k, v, is_causal=False, kv_lengths=None, implementation="xla",
        pad_multiple=multiple), static_argnums=3)
    ref, out = attend(q, k, v, 1), attend(q, k, v, 2)
    np.testing.assert_allclose(out, ref, atol=1e-6)


@pytest.mark.slow  # The two-tower test below pads both towers' attention in the default run.
def test_attention_modules_with_padding_match_and_share_parameters():
    x = jax.random.normal(jax.random.key(0), (2, 9, 16))
    plain = Attention(num_heads=2)
    params = plain.init(jax.random.key(1), x, x)
    padded = Attention(num_heads=2, pad_multiple=4)
    lengths = jnp.array([9, 5], jnp.int32)
    for causal in (False, True):
        want = plain.apply(params, x, x, kv_lengths=lengths, is_causal=causal)
        got = padded.apply(params, x, x, kv_lengths=lengths, is_causal=causal)
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_fused_qkv_equals_three_projections():
    """Self-attention projects q, k, v in one matmul; cross-attention of the same input
    (a copy, so not `is` the query) takes the three-matmul path: equal results."""
    x = jax.random.normal(jax.random.key(0), (2, 9, 16))
    module = Attention(num_heads=4)
    params = module.init(jax.random.key(1), x, x)
    assert set(params["params"]) == {"query_kernel", "query_bias", "key_kernel", "key_bias",
                                     "value_kernel", "value_bias", "out_kernel", "out_bias"}
    params = jax.tree.map(lambda p: p + 0.1, flax.core.meta.unbox(params))  # Non-zero biases.
    fused = module.apply(params, x, x)
    separate = module.apply(params, x, x + 0.0)
    np.testing.assert_allclose(fused, separate, atol=1e-6)


def _encoder_loss(encoder, params, x, lengths):
    def loss(params, x):
        y = encoder.apply({"params": params}, x, lengths)
        return jnp.sum(jnp.tanh(y) * jnp.cos(jnp.arange(y.shape[-1])))
    return jax.value_and_grad(loss, argnums=(0, 1))(params, x)


# One policy in the default run (it saves both names and dots, and unrolls the scan);
# each other policy by `pytest -m slow`.
@pytest.mark.parametrize("policy, scan_unroll", [
    pytest.param("full", 1, marks=pytest.mark.slow),
    pytest.param("save_dots", 1, marks=pytest.mark.slow),
    pytest.param("save_attention", 1, marks=pytest.mark.slow),
    ("save_dots_and_attention", 2)])
def test_remat_policies_and_unrolled_scans_give_equal_loss_and_gradients(policy, scan_unroll):
    x = jax.random.normal(jax.random.key(0), (2, 6, 16))
    lengths = jnp.array([6, 3], jnp.int32)
    common = dict(depth=2, num_heads=2, mlp_dim=32, scan_layers=True, causal=True)
    plain = Encoder(**common)
    params = jax.jit(plain.init)(jax.random.key(1), x, lengths)["params"]
    (want_loss, (want_p, want_x)) = jax.jit(lambda p, x: _encoder_loss(plain, p, x, lengths))(
        params, x)
    variant = Encoder(**common, remat=True, remat_policy=policy, scan_unroll=scan_unroll)
    (loss, (grad_p, grad_x)) = jax.jit(lambda p, x: _encoder_loss(variant, p, x, lengths))(
        params, x)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    np.testing.assert_allclose(grad_x, want_x, atol=1e-6)
    for got, want in zip(jax.tree.leaves(grad_p), jax.tree.leaves(want_p), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_unknown_remat_policy_is_an_error():
    x = jnp.zeros((1, 4, 16))
    with pytest.raises(ValueError, match="remat_policy='keep_all' is unknown"):
        Encoder(depth=1, num_heads=2, mlp_dim=8, remat=True, remat_policy="keep_all").init(
            jax.random.key(0), x)


@pytest.mark.parametrize("channels", [1, 3])
def test_patch_embedding_as_a_matmul_equals_the_convolution(channels):
    images = jax.random.normal(jax.random.key(0), (2, 32, 48, channels))
    conv = PatchEmbed(patch_size=16, width=24, implementation="conv")
    params = flax.core.meta.unbox(conv.init(jax.random.key(1), images))
    assert params["params"]["kernel"].shape == (16, 16, channels, 24)
    params = jax.tree.map(lambda p: p + 0.01, params)
    want = conv.apply(params, images)
    got = PatchEmbed(patch_size=16, width=24, implementation="dense").apply(params, images)
    assert got.shape == want.shape == (2, 2, 3, 24)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_integer_images_are_normalised_on_the_device_like_the_host_does():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(2, 4, 4, 1))
    mean, std = 0.5, 0.25
    host = ((x - mean) / std).astype(np.float32)
    for dtype, top in ((np.uint16, 65535), (np.uint8, 255)):
        pixels = np.round(x * top).astype(dtype)
        got = normalize_pixels(jnp.asarray(pixels), mean, std, jnp.float32)
        np.testing.assert_allclose(got, host, atol=0.5 / top / std + 1e-6)
        np.testing.assert_allclose(batch_schema.intensities(pixels, mean, std), pixels / top)
    np.testing.assert_array_equal(normalize_pixels(jnp.asarray(host), mean, std, jnp.float32),
                                  host)
    np.testing.assert_allclose(batch_schema.intensities(host, mean, std), x, atol=1e-6)


def test_two_tower_with_every_speed_option_equals_the_plain_model():
    """uint16 images, cuDNN-style padding (with the XLA kernel), dense patches, a remat
    policy and a partly unrolled scan: the same embeddings and loss gradients as float
    images through the plain model."""
    base = config_lib.config_from_flags(
        "experiments/tiny_synthetic.py:runlocal",
        ["model.scan_layers=True", "model.image.patch_embed=conv", "model.image.depth=2",
         "model.text.depth=1"])
    fast = config_lib.apply_overrides(base, [
        "model.remat_policy=save_dots_and_attention", "model.scan_unroll=2",
        "model.attention_pad_multiple=8", "model.image.patch_embed=dense",
        "data.image_dtype=uint16"])
    plain_model = models.build_model(base.model, base.data)
    fast_model = models.build_model(fast.model, fast.data)
    rng = np.random.default_rng(0)
    size, length = base.data.image_size, base.data.max_text_len
    pixels = rng.integers(0, 65536, (4, size, size, 1)).astype(np.uint16)
    images = ((pixels / 65535.0 - base.data.image_mean) / base.data.image_std).astype(np.float32)
    tokens = np.zeros((4, length), np.int32)
    tokens[:, 0], tokens[:, 1:6], tokens[:, 6] = 2, rng.integers(4, 50, (4, 5)), models.EOS_ID
    params = jax.jit(plain_model.init)(jax.random.key(0), images, tokens)["params"]
    fields = batch_schema.batch_fields(fast.data, 4)
    assert fields["image"][1] == np.uint16

    def loss(model, params, images):
        out = model.apply({"params": params}, images, tokens)
        logits = out["image_emb"] @ out["text_emb"].T * out["scale"]
        return jnp.mean(jax.nn.log_softmax(logits)[np.arange(4), np.arange(4)]), out

    (want, want_out), want_grads = jax.jit(jax.value_and_grad(
        lambda p: loss(plain_model, p, images), has_aux=True))(params)
    (got, got_out), got_grads = jax.jit(jax.value_and_grad(
        lambda p: loss(fast_model, p, pixels), has_aux=True))(params)
    for name in ("image_emb", "text_emb"):
        np.testing.assert_allclose(got_out[name], want_out[name], atol=2e-5)
    np.testing.assert_allclose(got, want, atol=2e-5)
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(a, b, atol=5e-5)


def test_model_options_are_checked():
    config = config_lib.config_from_flags("experiments/tiny_synthetic.py:runlocal", [])
    for override, message in (("model.scan_unroll=0", "scan_unroll must be >= 1"),
                              ("model.attention_pad_multiple=0",
                               "attention_pad_multiple must be >= 1")):
        bad = config_lib.apply_overrides(config, [override])
        with pytest.raises(ValueError, match=message):
            models.build_model(bad.model, bad.data)
    assert models.remat_policy_of(config.model) == "none"
    remat = config_lib.apply_overrides(config, ["model.remat=True"])
    assert models.remat_policy_of(remat.model) == "full"
    policy = config_lib.apply_overrides(config, ["model.remat_policy=save_dots"])
    assert models.remat_policy_of(policy.model) == "save_dots"
    assert training.dummy_inputs(policy.data)[0].dtype == np.float32
