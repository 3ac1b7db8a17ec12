"""In-device tiles: one block of rows x columns scored tile by tile, never whole.

A block of n rows (this device's images) against m columns (a visiting block of texts)
is folded into per-example statistics one [t, t] tile at a time (a `fori_loop` over the
tiles): per row and per column a running maximum and a log-sum-exp rescaled online,
the target mass, the sum of target-weighted logits, the sum of logits (label smoothing)
and the best positive logit (top-1). The backward pass recomputes each tile's logits
from the embeddings and those statistics and accumulates the embedding gradients tile
by tile. Live memory is O((n + m) * dim) plus one tile, whatever n and m; with t equal
to the block size there is one tile and this is the untiled ring step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxmedclip.losses import targets as T
from jaxmedclip.losses.spec import LossSpec


def side_stats(n: int, spec: LossSpec) -> dict[str, jax.Array]:
    """Streaming statistics of n rows (or columns) over the valid partners seen so far."""
    stats = {
        "max": jnp.full((n,), -jnp.inf), "pos_max": jnp.full((n,), -jnp.inf),
        "target_mass": jnp.zeros((n,)),
    }
    if spec.softmax:
        stats.update(
            sumexp=jnp.zeros((n,)), target_logit=jnp.zeros((n,)), logit_sum=jnp.zeros((n,)),
        )
    return stats


def update_side(stats, logits, affinity, positive, partner_valid, axis, spec):
    """Folds one tile into `stats`, reducing over `axis` (1: rows, 0: columns)."""
    masked = jnp.where(partner_valid, logits, -jnp.inf)
    weights = jnp.where(partner_valid, affinity, 0.0)
    new = {
        "max": jnp.maximum(stats["max"], jnp.max(masked, axis=axis)),
        "pos_max": jnp.maximum(
            stats["pos_max"], jnp.max(jnp.where(positive, masked, -jnp.inf), axis=axis)
        ),
        "target_mass": stats["target_mass"] + jnp.sum(weights, axis),
    }
    if spec.softmax:
        ref = jnp.where(jnp.isfinite(new["max"]), new["max"], 0.0)
        exps = jnp.where(partner_valid, jnp.exp(logits - jnp.expand_dims(ref, axis)), 0.0)
        new["sumexp"] = stats["sumexp"] * jnp.exp(stats["max"] - ref) + jnp.sum(exps, axis)
        new["target_logit"] = stats["target_logit"] + jnp.sum(weights * logits, axis)
        new["logit_sum"] = stats["logit_sum"] + jnp.sum(
            jnp.where(partner_valid, logits, 0.0), axis
        )
    return new


def logsumexp(stats: dict) -> jax.Array:
    return jnp.where(stats["sumexp"] > 0, stats["max"] + jnp.log(stats["sumexp"]), 0.0)


def safe_mass(stats: dict) -> jax.Array:
    return jnp.where(stats["target_mass"] > 0, stats["target_mass"], 1.0)


def side_loss_sum(stats: dict, counted: jax.Array, partners: jax.Array,
                  spec: LossSpec) -> jax.Array:
    """Summed cross-entropy of the `counted` rows; `partners`: valid ones of the other side."""
    eps = spec.label_smoothing
    nll = (
        logsumexp(stats)
        - (1 - eps) * stats["target_logit"] / safe_mass(stats)
        - eps * stats["logit_sum"] / jnp.maximum(partners, 1.0)
    )
    return jnp.sum(jnp.where(counted, nll, 0.0))


def _take(tree: Any, start, size: int) -> Any:
    return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, size, 0), tree)


def _put(tree: Any, part: Any, start) -> Any:
    return jax.tree.map(lambda a, p: jax.lax.dynamic_update_slice_in_dim(a, p, start, 0),
                        tree, part)


def for_each_tile(num_rows: int, num_cols: int, tile: int, body: Callable, carry: Any) -> Any:
    """`carry = body(row_start, col_start, carry)` over every [tile, tile] tile."""
    if num_rows % tile or num_cols % tile:
        raise ValueError(f"tile {tile} does not divide the block {num_rows} x {num_cols}")
    row_tiles, col_tiles = num_rows // tile, num_cols // tile
    if row_tiles * col_tiles == 1:
        return body(0, 0, carry)

    def step(i, carry):
        return body((i // col_tiles) * tile, (i % col_tiles) * tile, carry)

    return jax.lax.fori_loop(0, row_tiles * col_tiles, step, carry)


def fold_block(x, rows: T.Examples, y, cols: T.Examples, scale, bias, row_stats, col_stats,
               sums, *, spec: LossSpec, tile: int):
    """Folds the block rows x cols into (row_stats, col_stats, sums), tile by tile.

    `sums` holds the pair sums of the metrics (pos/neg logit sums and counts) and, for
    the sigmoid loss, "pairs": the summed pair losses.
    """

    def body(r0, c0, carry):
        row_stats, col_stats, sums = carry
        rr, cc = _take(rows, r0, tile), _take(cols, c0, tile)
        _, logits = T.logits(_take(x, r0, tile), _take(y, c0, tile), scale, bias, spec)
        affinity, positive = T.pair_targets(rr, cc, spec)
        valid_pairs = rr.image_valid[:, None] & cc.text_valid[None, :]
        rs = update_side(_take(row_stats, r0, tile), logits, affinity, positive,
                         cc.text_valid[None, :], 1, spec)
        cs = update_side(_take(col_stats, c0, tile), logits, affinity, positive,
                         rr.image_valid[:, None], 0, spec)
        tile_sums = T.pair_logit_sums(logits, positive, valid_pairs)
        if "pairs" in sums:
            pairs = T.sigmoid_pair_loss(logits, affinity, spec)
            tile_sums["pairs"] = jnp.sum(jnp.where(valid_pairs, pairs, 0.0))
        sums = {k: v + tile_sums[k] for k, v in sums.items()}
        return _put(row_stats, rs, r0), _put(col_stats, cs, c0), sums

    return for_each_tile(x.shape[0], y.shape[0], tile, body, (row_stats, col_stats, sums))


def grad_block(x, rows: T.Examples, row_res: dict, y, cols: T.Examples, col_res: dict,
               scale, bias, ct_i2t, ct_t2i, inv_images, inv_texts, dx, dy, dscalars,
               *, spec: LossSpec, tile: int):
    """Adds the block's contribution to dx [n, d], dy [m, d] (float32) and
    dscalars = (d scale, d bias), recomputing each tile's logits.

    `row_res` / `col_res` (softmax only): per-example "lse" (log-sum-exp over valid
    partners), "mass" (target mass, 1 where none) and "counted" of the rows / columns.
    """
    eps = spec.label_smoothing

    def body(r0, c0, carry):
        dx, dy, (dscale, dbias) = carry
        rr, cc = _take(rows, r0, tile), _take(cols, c0, tile)
        xr, yc = _take(x, r0, tile), _take(y, c0, tile)
        dots, logits = T.logits(xr, yc, scale, bias, spec)
        affinity, _ = T.pair_targets(rr, cc, spec)
        valid_pairs = rr.image_valid[:, None] & cc.text_valid[None, :]
        if spec.softmax:
            rres, cres = _take(row_res, r0, tile), _take(col_res, c0, tile)
            # exp() arguments are <= 0 for valid pairs; the clamp keeps masked ones finite.
            p_row = jnp.exp(jnp.minimum(logits - rres["lse"][:, None], 0.0))
            p_col = jnp.exp(jnp.minimum(logits - cres["lse"][None, :], 0.0))
            t_row = (1 - eps) * affinity / rres["mass"][:, None] + eps * inv_texts
            t_col = (1 - eps) * affinity / cres["mass"][None, :] + eps * inv_images
            # Rows (columns) left out of their direction's loss get no gradient from it.
            d_row = jnp.where(rres["counted"][:, None], p_row - t_row, 0.0)
            d_col = jnp.where(cres["counted"][None, :], p_col - t_col, 0.0)
            dlogits = ct_i2t * d_row + ct_t2i * d_col
        else:
            dlogits = (ct_i2t + ct_t2i) * T.sigmoid_pair_grad(logits, affinity, spec)
        dlogits = jnp.where(valid_pairs, dlogits, 0.0)
        dx = _put(dx, _take(dx, r0, tile) + scale * T.matmul(dlogits, yc, spec), r0)
        dy = _put(dy, _take(dy, c0, tile) + scale * T.matmul(dlogits.T, xr, spec), c0)
        dscalars = (dscale + jnp.sum(dlogits * dots), dbias + jnp.sum(dlogits))
        return dx, dy, dscalars

    return for_each_tile(x.shape[0], y.shape[0], tile, body, (dx, dy, dscalars))
