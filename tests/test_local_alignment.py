"""GLoRIA local alignment: sub-word pooling, the dense loss against a float64 numpy
transcription, and the sharded loss against the dense one (values and gradients).
Needs the 8 fake CPU devices of conftest.py."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmedclip.methods import local_alignment as la

MESHES = {"data8": ((8,), ("data",)), "data4_fsdp2": ((4, 2), ("data", "fsdp"))}
TOL = 1e-5
T1, T2, T3 = 4.0, 5.0, 10.0


def make_mesh(name):
    shape, names = MESHES[name]
    devices = np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape)
    return Mesh(devices, names, axis_types=(AxisType.Auto,) * len(names))


def make_inputs(batch=16, regions=5, words=6, dim=8, seed=0):
    """Related image/word features, ragged word masks, padded examples."""
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(batch, regions, dim)).astype(np.float32)
    text = (image[:, rng.integers(0, regions, words)] + 0.7 * rng.normal(
        size=(batch, words, dim))).astype(np.float32)
    lengths = rng.integers(1, words + 1, batch)
    lengths[3] = 0  # A text without words.
    word_mask = np.arange(words)[None, :] < lengths[:, None]
    mask = np.ones(batch, bool)
    mask[[5, batch - 1]] = False
    return image, text, word_mask, mask


# ----------------------------------------------------------------------------- sub-words


def test_word_start_table():
    pieces = ["<pad>", "<unk>", "<s>", "</s>", "\u2581no", "\u2581eff", "usion", "."]
    np.testing.assert_array_equal(la.word_start_table(pieces),
                                  [False, False, False, False, True, True, False, False])


def test_merge_subwords_on_hand_built_tokens():
    # ids: 4 "▁no", 5 "▁eff", 6 "usion", 7 "." ; 2 BOS, 3 EOS, 0 pad.
    starts = la.word_start_table(["<pad>", "<unk>", "<s>", "</s>", "\u2581no", "\u2581eff",
                                  "usion", "."])
    ids = np.array([[2, 4, 5, 6, 7, 3, 0, 0],
                    [2, 6, 5, 3, 0, 0, 0, 0]], np.int32)  # Row 2 starts mid-word.
    features = np.arange(2 * 8 * 2, dtype=np.float32).reshape(2, 8, 2)
    words, word_mask = la.merge_subwords(jnp.asarray(features), jnp.asarray(ids), starts)
    assert words.shape == (2, 8, 2) and word_mask.shape == (2, 8)
    np.testing.assert_array_equal(word_mask[0], [1, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(word_mask[1], [1, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(words[0, 0], features[0, 1])  # "no"
    np.testing.assert_allclose(words[0, 1], features[0, 2:5].mean(0))  # "eff" "usion" "."
    np.testing.assert_allclose(words[1, 0], features[1, 1])  # "usion" after BOS: a word
    np.testing.assert_allclose(words[1, 1], features[1, 2])
    np.testing.assert_allclose(words[:, 2:], 0.0)
    truncated, truncated_mask = la.merge_subwords(jnp.asarray(features), jnp.asarray(ids),
                                                  starts, max_words=1)
    assert truncated.shape == (2, 1, 2) and bool(truncated_mask.all())
    np.testing.assert_allclose(truncated[:, 0], words[:, 0])


# ------------------------------------------------------------------------------- dense


def numpy_local_loss(image, text, word_mask, mask, t1, t2, t3):
    """Float64 loops over the (image, text) pairs, straight from the module docstring."""
    image, text = image.astype(np.float64), text.astype(np.float64)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    batch = image.shape[0]
    s = np.zeros((batch, batch))
    for i in range(batch):
        for j in range(batch):
            valid = word_mask[j]
            if not valid.any():
                continue
            words = unit(text[j][valid])
            cosine = words @ unit(image[i]).T
            attention = np.exp(t1 * cosine)
            attention /= attention.sum(1, keepdims=True)
            context = attention @ image[i]
            agreement = np.sum(unit(context) * words, axis=1)
            s[i, j] = np.log(np.sum(np.exp(t2 * agreement))) / t2
    logits = t3 * s
    valid = np.flatnonzero(mask)
    sub = logits[np.ix_(valid, valid)]
    log_softmax = lambda x: x - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1,
                                        keepdims=True)) - x.max(1, keepdims=True)
    i2t = -np.mean(np.diag(log_softmax(sub)))
    t2i = -np.mean(np.diag(log_softmax(sub.T)))
    return 0.5 * i2t + 0.5 * t2i, i2t, t2i


def run(image, text, word_mask, mask, impl="dense", mesh=None, batch_axes=("data",)):
    def loss_fn(image, text, t1, t2, t3):
        return la.local_alignment_loss(image, text, word_mask, mask, t1=t1, t2=t2, t3=t3,
                                       impl=impl, mesh=mesh, batch_axes=batch_axes)

    if mesh is not None:
        rows = NamedSharding(mesh, P(tuple(batch_axes)))
        image, text = jax.device_put(image, rows), jax.device_put(text, rows)
        word_mask, mask = jax.device_put(word_mask, rows), jax.device_put(mask, rows)
    step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3, 4), has_aux=True))
    (loss, metrics), grads = step(image, text, jnp.float32(T1), jnp.float32(T2),
                                  jnp.float32(T3))
    as_np = lambda x: np.asarray(x, np.float32)
    return as_np(loss), jax.tree.map(as_np, metrics), [as_np(g) for g in grads]


def test_dense_matches_numpy_reference():
    image, text, word_mask, mask = make_inputs()
    loss, metrics, grads = dense_result()
    want, i2t, t2i = numpy_local_loss(image, text, word_mask, mask, T1, T2, T3)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_i2t"], i2t, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_t2i"], t2i, rtol=1e-5)
    # Padded examples get no gradient; every gradient is finite.
    assert all(np.all(np.isfinite(g)) for g in grads)
    np.testing.assert_array_equal(grads[0][~mask], 0.0)
    np.testing.assert_array_equal(grads[1][~mask], 0.0)
    np.testing.assert_array_equal(grads[1][~word_mask], 0.0)


def test_matching_pairs_score_higher():
    image, _, _, _ = make_inputs(batch=8)
    text = image[:, :4] + 0.05 * np.random.default_rng(1).normal(size=(8, 4, 8))
    s = la.local_similarity(jnp.asarray(image), jnp.asarray(text, jnp.float32),
                            jnp.ones((8, 4), bool), T1, T2)
    assert np.all(np.argmax(np.asarray(s), axis=1) == np.arange(8))


# ----------------------------------------------------------------------------- sharded


@functools.cache
def dense_result():
    return run(*make_inputs())


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
@pytest.mark.parametrize("impl", ("all_gather", "ring"))
def test_sharded_matches_dense(impl, mesh_name):
    image, text, word_mask, mask = make_inputs()
    expected = dense_result()
    axes = MESHES[mesh_name][1]
    got = run(image, text, word_mask, mask, impl, make_mesh(mesh_name), axes)
    np.testing.assert_allclose(got[0], expected[0], rtol=TOL, atol=TOL)
    for key in expected[1]:
        np.testing.assert_allclose(got[1][key], expected[1][key], rtol=TOL, atol=TOL,
                                   err_msg=key)
    for what, want, have in zip(("image", "text", "t1", "t2", "t3"), expected[2], got[2],
                                strict=True):
        np.testing.assert_allclose(have, want, rtol=TOL, atol=TOL, err_msg=f"grad {what}")


def test_errors_and_config():
    image, text, word_mask, mask = make_inputs(batch=12)
    with pytest.raises(ValueError, match="not divisible"):
        la.local_alignment_loss(image, text, word_mask, mask, impl="ring",
                                mesh=make_mesh("data8"), batch_axes="data")
    with pytest.raises(ValueError, match="impl="):
        la.local_alignment_loss(image, text, word_mask, mask, impl="chunked")
    with pytest.raises(ValueError, match="expected image_tokens"):
        la.local_alignment_loss(image, text[:, :, :3], word_mask, mask)
    local = ml_collections.ConfigDict({"weight": 1.0, "max_words": 8, "t3": 20.0})
    kwargs = la.local_alignment_config(local, default_impl="ring")
    assert kwargs["t3"] == 20.0 and kwargs["t1"] == 4.0 and kwargs["impl"] == "ring"
    with pytest.raises(ValueError, match="is not a config field"):
        la.local_alignment_config({"temperature": 1.0})
