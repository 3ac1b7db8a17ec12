"""The dense reference: plain jnp on the global [B, B] logit matrix."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmedclip.losses import targets as T
from jaxmedclip.losses.spec import LossSpec


def dense_sums(x: jax.Array, y: jax.Array, scale: jax.Array, bias: jax.Array, raw: dict,
               spec: LossSpec) -> dict[str, jax.Array]:
    """The global sums `targets.finish` reads, from whole (unsharded) arrays."""
    rows = T.examples(raw, jnp.arange(x.shape[0], dtype=jnp.int32))
    images, texts = rows.image_valid, rows.text_valid
    num_images = jnp.sum(images, dtype=jnp.float32)
    num_texts = jnp.sum(texts, dtype=jnp.float32)
    _, logits = T.logits(x, y, scale, bias, spec)
    affinity, positive = T.pair_targets(rows, rows, spec)
    valid_pairs = images[:, None] & texts[None, :]
    # The counted images (texts): valid, with target mass over the valid other side.
    counted_images = images & (T.target_mass(affinity, texts) > 0)
    counted_texts = texts & (T.target_mass(affinity.T, images) > 0)
    if spec.softmax:
        i2t = jnp.sum(T.softmax_row_losses(logits, affinity, counted_images, texts, num_texts,
                                           spec))
        t2i = jnp.sum(T.softmax_row_losses(logits.T, affinity.T, counted_texts, images,
                                           num_images, spec))
    else:
        pairs = T.sigmoid_pair_loss(logits, affinity, spec)
        i2t = t2i = jnp.sum(jnp.where(valid_pairs, pairs, 0.0))
    correct = lambda *a: jnp.sum(T.top1_correct(*a), dtype=jnp.float32)
    return {
        "i2t": i2t,
        "t2i": t2i,
        "correct_i2t": correct(logits, positive, counted_images, texts),
        "correct_t2i": correct(logits.T, positive.T, counted_texts, images),
        "count_i2t": jnp.sum(counted_images, dtype=jnp.float32),
        "count_t2i": jnp.sum(counted_texts, dtype=jnp.float32),
        "images": num_images,
        "texts": num_texts,
        **T.pair_logit_sums(logits, positive, valid_pairs),
    }
