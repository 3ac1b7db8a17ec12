"""CXR-CLIP multi-view terms: the dense combination against a float64 numpy InfoNCE,
and the sharded terms against the dense ones (values and gradients). Needs the 8 fake
CPU devices of conftest.py."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmedclip import losses
from jaxmedclip.methods import multiview

MESHES = {"data8": ((8,), ("data",)), "data4_fsdp2": ((4, 2), ("data", "fsdp"))}
TOL = 1e-5
SCALE = 8.0


def make_mesh(name):
    shape, names = MESHES[name]
    devices = np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape)
    return Mesh(devices, names, axis_types=(AxisType.Auto,) * len(names))


def make_inputs(batch=16, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(batch, dim))
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    views = [unit(base + 0.6 * rng.normal(size=base.shape)) for _ in range(4)]
    mask = np.ones(batch, bool)
    mask[[2, batch - 1]] = False
    return views[:2], views[2:], {"mask": mask}


def loss_config(impl="dense", tile_size=0, **multiview_fields):
    return ml_collections.ConfigDict(dict(
        name="softmax", impl=impl, targets="one_hot", tile_size=tile_size,
        multiview=ml_collections.ConfigDict(dict(
            image_text_weight=1.0, image_image_weight=0.5, text_text_weight=0.25,
            **multiview_fields)),
    ))


def run(config, images, texts, batch, mesh=None, batch_axes=("data",)):
    def loss_fn(x1, x2, t1, t2, scale):
        return multiview.multiview_loss((x1, x2), (t1, t2), scale, None, batch, config=config,
                                        mesh=mesh, batch_axes=batch_axes)

    arrays = [*images, *texts]
    if mesh is not None:
        rows = NamedSharding(mesh, P(tuple(batch_axes)))
        arrays = [jax.device_put(a, rows) for a in arrays]
        batch = {k: jax.device_put(v, rows) for k, v in batch.items()}
    step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3, 4), has_aux=True))
    (loss, metrics), grads = step(*arrays, jnp.float32(SCALE))
    as_np = lambda x: np.asarray(x, np.float32)
    return as_np(loss), jax.tree.map(as_np, metrics), [as_np(g) for g in grads]


def numpy_infonce(a, b, mask, scale):
    """Symmetric one-hot InfoNCE over the valid examples, float64."""
    a, b = a[mask].astype(np.float64), b[mask].astype(np.float64)
    logits = scale * a @ b.T
    ce = lambda x: np.mean(np.log(np.exp(x).sum(1)) - np.diag(x))
    return 0.5 * ce(logits) + 0.5 * ce(logits.T)


@functools.cache
def dense_result():
    return run(loss_config(), *make_inputs())


def test_dense_matches_numpy_combination():
    (x1, x2), (t1, t2), batch = make_inputs()
    loss, metrics, _ = dense_result()
    mask = batch["mask"]
    pairs = [numpy_infonce(x, t, mask, SCALE) for x in (x1, x2) for t in (t1, t2)]
    image_image = numpy_infonce(x1, x2, mask, SCALE)
    text_text = numpy_infonce(t1, t2, mask, SCALE)
    np.testing.assert_allclose(metrics["loss_image_text"], np.mean(pairs), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_image_image"], image_image, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_text_text"], text_text, rtol=1e-5)
    np.testing.assert_allclose(metrics["image2_text1/loss_i2t"] * 0.5
                               + metrics["image2_text1/loss_t2i"] * 0.5, pairs[2], rtol=1e-5)
    np.testing.assert_allclose(loss, np.mean(pairs) + 0.5 * image_image + 0.25 * text_text,
                               rtol=1e-5)
    summed, summed_metrics, _ = run(loss_config(image_text_reduction="sum"), *make_inputs())
    np.testing.assert_allclose(summed_metrics["loss_image_text"], np.sum(pairs), rtol=1e-5)
    np.testing.assert_allclose(summed, np.sum(pairs) + 0.5 * image_image + 0.25 * text_text,
                               rtol=1e-5)


@pytest.mark.parametrize("impl,mesh_name,tile_size", (
    ("all_gather", "data4_fsdp2", 0), ("ring", "data8", 0), ("ring", "data4_fsdp2", 3)))
def test_sharded_matches_dense(impl, mesh_name, tile_size):
    expected = dense_result()
    got = run(loss_config(impl, tile_size), *make_inputs(), mesh=make_mesh(mesh_name),
              batch_axes=MESHES[mesh_name][1])
    np.testing.assert_allclose(got[0], expected[0], rtol=TOL, atol=TOL)
    assert set(got[1]) == set(expected[1])
    for key in expected[1]:
        np.testing.assert_allclose(got[1][key], expected[1][key], rtol=TOL, atol=TOL,
                                   err_msg=key)
    for what, want, have in zip(("x1", "x2", "t1", "t2", "scale"), expected[2], got[2],
                                strict=True):
        np.testing.assert_allclose(have, want, rtol=TOL, atol=TOL, err_msg=f"grad {what}")


def test_config_errors():
    with pytest.raises(ValueError, match="is not a config field"):
        multiview.MultiviewSpec.from_config({"image_weight": 1.0})
    with pytest.raises(ValueError, match="image_text_reduction"):
        multiview.MultiviewSpec.from_config({"image_text_reduction": "max"})
    assert multiview.MultiviewSpec.from_config(None) == multiview.MultiviewSpec()
    images, texts, batch = make_inputs()
    with pytest.raises(ValueError, match="two image and two text"):
        multiview.multiview_loss(images[:1], texts, 1.0, None, batch, config=loss_config(),
                                 mesh=None, batch_axes="data")


def test_second_text_terms_read_text_id2():
    """multi_positive on text_id: the terms with text 2 match second texts by text_id2."""
    images, texts, batch = make_inputs()
    size = len(batch["mask"])
    batch = {**batch, "text_id": np.arange(size, dtype=np.int32),
             "text_id2": (np.arange(size) % 4).astype(np.int32)}
    config = loss_config()
    config.targets, config.multi_positive_key = "multi_positive", "text_id"
    _, metrics, _ = run(config, images, texts, batch)
    for a in (1, 2):
        for b, ids in ((1, batch["text_id"]), (2, batch["text_id2"])):
            expected, _ = losses.contrastive_loss(
                images[a - 1], texts[b - 1], SCALE, None, {**batch, "text_id": ids},
                config=config, mesh=None, batch_axes=())
            loss = 0.5 * (metrics[f"image{a}_text{b}/loss_i2t"]
                          + metrics[f"image{a}_text{b}/loss_t2i"])
            np.testing.assert_allclose(loss, expected, rtol=1e-5, err_msg=f"{a}{b}")
    # The second texts' shared ids make them positives: their term is not the first's.
    assert not np.isclose(metrics["image1_text2/loss_i2t"],
                          run(loss_config(), images, texts, batch)[1]["image1_text2/loss_i2t"])
