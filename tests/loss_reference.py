"""Shared by the loss tests: inputs, a float64 numpy transcription of the documented
semantics (values, metrics and gradients), and a jitted train-style call of the loss."""

import functools
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmedclip import losses

MESHES = {
    "data8": ((8,), ("data",)),
    "data4_fsdp2": ((4, 2), ("data", "fsdp")),
    "data2": ((2,), ("data",)),
    "single": ((1,), ("data",)),
}
LOSS_TARGETS = list(itertools.product(losses.LOSSES, losses.TARGETS))
SHARDED = ("all_gather", "ring")
TOL = 1e-5


def make_mesh(name, explicit=False):
    shape, names = MESHES[name]
    devices = np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape)
    types = (AxisType.Explicit if explicit else AxisType.Auto,) * len(names)
    return Mesh(devices, names, axis_types=types)


def make_inputs(global_batch=32, dim=16, num_labels=5, seed=0, near_identical=False):
    """Embeddings and a batch with padding, repeated study/text ids and label rows."""
    rng = np.random.default_rng(seed)
    if near_identical:
        base = rng.normal(size=(1, dim))
        image = base + 1e-3 * rng.normal(size=(global_batch, dim))
        text = base + 1e-3 * rng.normal(size=(global_batch, dim))
    else:
        image = rng.normal(size=(global_batch, dim))
        text = image + 0.8 * rng.normal(size=(global_batch, dim))
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    labels = rng.integers(-1, 2, size=(global_batch, num_labels)).astype(np.float32)
    labels[::7] = 0.0
    labels[1::5] = labels[3]
    mask = np.ones(global_batch, bool)
    mask[-3:] = False
    mask[5] = False
    batch = {
        "mask": mask,
        "study_id": rng.integers(0, global_batch // 3, global_batch).astype(np.int32),
        "text_id": rng.integers(0, global_batch // 2, global_batch).astype(np.int32),
        "labels": labels,
        "labels_present": labels != 0,
    }
    return image.astype(np.float32), text.astype(np.float32), batch


def loss_config(name, targets, impl="dense", **overrides):
    fields = dict(
        name=name, impl=impl, targets=targets, multi_positive_key=("study_id", "text_id"),
        soft_target_temperature=0.25, label_smoothing=0.1, i2t_weight=0.3, t2i_weight=0.7,
    )
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


def run_loss(config, image, text, batch, scale, bias, mesh=None, batch_axes=("data",)):
    """(loss, metrics, grads w.r.t. image, text, scale, bias) from one jitted train-style call."""

    def loss_fn(image, text, scale, bias, batch):
        return losses.contrastive_loss(
            image, text, scale, bias, batch, config=config, mesh=mesh, batch_axes=batch_axes
        )

    if mesh is not None:
        rows = NamedSharding(mesh, P(tuple(batch_axes)))
        image, text = jax.device_put(image, rows), jax.device_put(text, rows)
        batch = {k: jax.device_put(v, rows) for k, v in batch.items()}
    step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3), has_aux=True))
    (loss, metrics), grads = step(image, text, jnp.float32(scale), jnp.float32(bias), batch)
    to_numpy = lambda x: np.asarray(x, np.float32)
    return to_numpy(loss), jax.tree.map(to_numpy, metrics), [to_numpy(g) for g in grads]


@functools.cache
def dense_result(name, targets, near_identical=False, scale=10.0, bias=-5.0):
    image, text, batch = make_inputs(near_identical=near_identical)
    return run_loss(loss_config(name, targets), image, text, batch, scale, bias)


def assert_same(expected, actual, tol=TOL, accuracy_tol=TOL):
    loss, metrics, grads = expected
    got_loss, got_metrics, got_grads = actual
    np.testing.assert_allclose(got_loss, loss, rtol=tol, atol=tol)
    assert set(got_metrics) == set(metrics)
    for key in metrics:
        atol = accuracy_tol if key.startswith("acc_") else tol
        np.testing.assert_allclose(got_metrics[key], metrics[key], rtol=tol, atol=atol,
                                   err_msg=key)
    for what, want, got in zip(("image", "text", "scale", "bias"), grads, got_grads, strict=True):
        assert np.all(np.isfinite(got)), what
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=f"grad {what}")


def check_against_dense(name, targets, impl, mesh_name, near_identical=False, scale=10.0,
                        bias=-5.0, accuracy_tol=TOL):
    image, text, batch = make_inputs(near_identical=near_identical)
    mesh = make_mesh(mesh_name)
    actual = run_loss(
        loss_config(name, targets, impl), image, text, batch, scale, bias, mesh=mesh,
        batch_axes=mesh.axis_names,
    )
    assert_same(dense_result(name, targets, near_identical, scale, bias), actual,
                accuracy_tol=accuracy_tol)


# Nearly identical embeddings at scale 100 give near-ties among the top logits: the same
# pair's logit from a [local, local] block and from the [B, B] matrix may differ in the
# last bit, which can flip a top-1 decision. Allow two flips among the 28 valid examples.
NEAR_TIE_ACCURACY_TOL = 2.5 / 28


# ----------------------------------------------------------------------------------------
# The dense reference against a float64 numpy transcription of the documented semantics.


def reference_targets(batch, config):
    """Affinity (float64) and positive (bool) [B, B] of the documented semantics."""
    size = len(batch["mask"])
    same = np.eye(size, dtype=bool)
    if config.targets == "one_hot":
        return same.astype(float), same
    if config.targets == "multi_positive":
        match = same.copy()
        for key in config.multi_positive_key:
            match |= batch[key][:, None] == batch[key][None, :]
        return match.astype(float), match
    labels = batch["labels"].astype(np.float64)
    norm = np.linalg.norm(labels, axis=1)
    labelled = norm > 0
    unit = labels / np.where(labelled, norm, 1.0)[:, None]
    cosine = np.minimum(unit @ unit.T, 1.0)
    both = labelled[:, None] & labelled[None, :]
    affinity = np.where(
        same, 1.0, np.where(both, np.exp((cosine - 1) / config.soft_target_temperature), 0)
    )
    return affinity, same | (both & (cosine >= 1 - 1e-6))


def valid_sides(batch):
    """(valid images, valid texts) bool [B]: `mask` and each side's own mask."""
    mask = batch["mask"]
    return (mask & batch.get("image_mask", np.ones_like(mask)),
            mask & batch.get("text_mask", np.ones_like(mask)))


def numpy_reference(image, text, scale, bias, batch, config):
    image, text = image.astype(np.float64), text.astype(np.float64)
    logits = scale * image @ text.T + (bias if config.name == "sigmoid" else 0.0)
    affinity, positive = reference_targets(batch, config)
    images, texts = valid_sides(batch)
    rows, cols = np.flatnonzero(images), np.flatnonzero(texts)
    eps = config.label_smoothing

    def counted(affinity, queries, candidates):
        """Queries with target mass among the candidates; the others are left out."""
        return [i for i in queries if affinity[i, candidates].sum() > 0]

    def softmax_direction(logits, affinity, queries, candidates):
        total = 0.0
        queries = counted(affinity, queries, candidates)
        for i in queries:
            row = logits[i, candidates]
            log_probs = row - np.log(np.sum(np.exp(row - row.max()))) - row.max()
            target = affinity[i, candidates] / affinity[i, candidates].sum()
            target = (1 - eps) * target + eps / len(candidates)
            total -= np.sum(target * log_probs)
        return total / len(queries)

    def accuracy(logits, affinity, positive, queries, candidates):
        return np.mean([positive[i, candidates[np.argmax(logits[i, candidates])]]
                        for i in counted(affinity, queries, candidates)])

    if config.name == "softmax":
        loss_i2t = softmax_direction(logits, affinity, rows, cols)
        loss_t2i = softmax_direction(logits.T, affinity.T, cols, rows)
        loss = config.i2t_weight * loss_i2t + config.t2i_weight * loss_t2i
    else:
        target = (1 - eps) * affinity + eps / 2
        log_sig = lambda z: -np.logaddexp(0.0, -z)
        pairs = -(target * log_sig(logits) + (1 - target) * log_sig(-logits))
        loss = pairs[np.ix_(rows, cols)].sum() / ((len(rows) + len(cols)) / 2)
        loss_i2t = loss_t2i = loss
    pair_valid = images[:, None] & texts[None, :]
    metrics = {
        "loss_i2t": loss_i2t,
        "loss_t2i": loss_t2i,
        "acc_i2t": accuracy(logits, affinity, positive, rows, cols),
        "acc_t2i": accuracy(logits.T, affinity.T, positive.T, cols, rows),
        "logit_pos": logits[pair_valid & positive].mean(),
        "logit_neg": logits[pair_valid & ~positive].mean(),
    }
    return loss, metrics


def per_side_inputs():
    """`make_inputs` plus random per-side masks that exercise every documented case."""
    image, text, batch = make_inputs()
    rng = np.random.default_rng(7)
    size = len(image)
    image_mask, text_mask = rng.random(size) > 0.3, rng.random(size) > 0.2
    image_mask[8:12] = True
    image_mask[12:16] = False  # A whole device of data8 without images.
    image_mask[7], text_mask[7] = False, True  # Blank labels, no image: no soft target.
    image_mask[28], text_mask[28] = True, False  # Blank labels, no text: no soft target.
    image_mask[20] = text_mask[20] = False  # Neither side.
    assert not batch["labels"][[7, 28]].any() and batch["mask"][[7, 28]].all()
    return image, text, dict(batch, image_mask=image_mask, text_mask=text_mask)


def numpy_reference_grads(image, text, scale, bias, batch, config):
    """float64 gradients of the documented loss w.r.t. (image, text, scale, bias), from
    its gradient w.r.t. the logits: (p - target) / count per softmax direction, and
    (sigmoid(l) - target) / ((N_img + N_txt) / 2) per valid sigmoid pair."""
    image, text = image.astype(np.float64), text.astype(np.float64)
    dots = image @ text.T
    sigmoid = config.name == "sigmoid"
    logits = scale * dots + (bias if sigmoid else 0.0)
    affinity, _ = reference_targets(batch, config)
    images, texts = valid_sides(batch)
    eps = config.label_smoothing
    if sigmoid:
        target = (1 - eps) * affinity + eps / 2
        valid = images[:, None] & texts[None, :]
        grad = np.where(valid, 1 / (1 + np.exp(-logits)) - target, 0.0)
        grad /= (images.sum() + texts.sum()) / 2
    else:

        def direction(logits, affinity, queries, candidates, weight):
            out = np.zeros_like(logits)
            cands = np.flatnonzero(candidates)
            counted = [i for i in np.flatnonzero(queries) if affinity[i, cands].sum() > 0]
            for i in counted:
                row = logits[i, cands]
                p = np.exp(row - row.max())
                p /= p.sum()
                t = (1 - eps) * affinity[i, cands] / affinity[i, cands].sum() + eps / len(cands)
                out[i, cands] = weight * (p - t) / len(counted)
            return out

        grad = (direction(logits, affinity, images, texts, config.i2t_weight)
                + direction(logits.T, affinity.T, texts, images, config.t2i_weight).T)
    dbias = grad.sum() if sigmoid else 0.0
    return [scale * grad @ text, scale * grad.T @ image, np.sum(grad * dots), dbias]


def assert_matches_reference(got, image, text, batch, config, scale=10.0, bias=-5.0):
    """`got` = (loss, metrics, grads) of `run_loss` against the float64 transcription:
    value and every metric, within TOL."""
    loss, metrics, _ = got
    want_loss, want_metrics = numpy_reference(image, text, scale, bias, batch, config)
    np.testing.assert_allclose(loss, want_loss, rtol=TOL, atol=TOL)
    assert set(metrics) == set(want_metrics)
    for key, want in want_metrics.items():
        np.testing.assert_allclose(metrics[key], want, rtol=TOL, atol=TOL, err_msg=key)
    return want_loss
