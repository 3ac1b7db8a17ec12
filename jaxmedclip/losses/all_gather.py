"""all_gather: under `shard_map`, each device gathers the other side's embeddings (and
the small per-example target information) and scores its local rows against the global
batch. Memory per device grows with the global batch ([local, B] logits)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmedclip.losses import targets as T
from jaxmedclip.losses.collectives import all_gather, global_ids, psum
from jaxmedclip.losses.spec import LossSpec


def all_gather_body(x, y, scale, bias, raw, *, spec: LossSpec, axes: tuple[str, ...]):
    """The global sums, inside `shard_map` over `axes` (replicated on every device)."""
    gather = lambda a: all_gather(a, axes)
    rows = T.examples(raw, global_ids(x.shape[0], axes))
    cols = T.examples({k: gather(v) for k, v in raw.items()}, gather(rows.ids))
    num_images = psum(jnp.sum(rows.image_valid, dtype=jnp.float32), axes)
    num_texts = psum(jnp.sum(rows.text_valid, dtype=jnp.float32), axes)
    # Gathered in float32 so that the backward reduce-scatter of gradients sums in float32.
    x32, y32 = x.astype(jnp.float32), y.astype(jnp.float32)
    _, logits = T.logits(x32, gather(y32), scale, bias, spec)
    affinity, positive = T.pair_targets(rows, cols, spec)
    valid_pairs = rows.image_valid[:, None] & cols.text_valid[None, :]
    counted_images = rows.image_valid & (T.target_mass(affinity, cols.text_valid) > 0)
    sums = T.pair_logit_sums(logits, positive, valid_pairs)
    sums["correct_i2t"] = jnp.sum(
        T.top1_correct(logits, positive, counted_images, cols.text_valid), dtype=jnp.float32
    )
    sums["count_i2t"] = jnp.sum(counted_images, dtype=jnp.float32)
    if spec.softmax:
        # A is symmetric, so the local text rows against all images use the same targets.
        _, text_logits = T.logits(y32, gather(x32), scale, bias, spec)
        counted_texts = rows.text_valid & (T.target_mass(affinity, cols.image_valid) > 0)
        sums["i2t"] = jnp.sum(T.softmax_row_losses(
            logits, affinity, counted_images, cols.text_valid, num_texts, spec))
        sums["t2i"] = jnp.sum(T.softmax_row_losses(
            text_logits, affinity, counted_texts, cols.image_valid, num_images, spec))
        sums["correct_t2i"] = jnp.sum(
            T.top1_correct(text_logits, positive, counted_texts, cols.image_valid),
            dtype=jnp.float32,
        )
        sums["count_t2i"] = jnp.sum(counted_texts, dtype=jnp.float32)
    else:
        pairs = T.sigmoid_pair_loss(logits, affinity, spec)
        sums["i2t"] = sums["t2i"] = jnp.sum(jnp.where(valid_pairs, pairs, 0.0))
        # Column statistics over all images: combine the local rows' across devices.
        frozen = jax.lax.stop_gradient(logits)
        images = rows.image_valid[:, None]
        best = jax.lax.pmax(jnp.max(jnp.where(images, frozen, -jnp.inf), axis=0), axes)
        best_pos = jax.lax.pmax(
            jnp.max(jnp.where(images & positive, frozen, -jnp.inf), axis=0), axes
        )
        column_mass = psum(T.target_mass(affinity.T, rows.image_valid), axes)
    sums = {k: psum(v, axes) for k, v in sums.items()}
    if not spec.softmax:
        # Already global: every device holds all columns' statistics.
        counted_texts = cols.text_valid & (column_mass > 0)
        sums["correct_t2i"] = jnp.sum(counted_texts & (best_pos >= best), dtype=jnp.float32)
        sums["count_t2i"] = jnp.sum(counted_texts, dtype=jnp.float32)
    sums["images"], sums["texts"] = num_images, num_texts
    return sums
