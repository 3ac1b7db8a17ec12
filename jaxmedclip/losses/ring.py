"""ring: the text block and its target information travel around the devices of the
batch axes (`ppermute`); each step folds one visiting [local, local] block into
per-example statistics, tile by tile (`tiles.fold_block`).

Softmax rows use a streaming log-sum-exp; column (text->image) statistics travel with
their text block and arrive home after a full turn. The backward pass (`custom_vjp`) is
a second ring that recomputes each tile's logits; the gradient of a visiting text block
travels with it. A device holds its own embeddings, one visiting block, the travelling
gradient and O(local) statistics: with tiles, loss memory is O(local batch x dim); the
number of devices does not enter. Without a mesh the same code runs on one device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxmedclip.losses import targets as T
from jaxmedclip.losses import tiles
from jaxmedclip.losses.collectives import Axes, axes_size, global_ids, psum, ring_pass
from jaxmedclip.losses.spec import LossSpec


def _pad(x, y, raw, tile: int):
    """Pads the local rows to a multiple of `tile` with examples valid on neither side."""
    extra = -x.shape[0] % tile
    if not extra:
        return x, y, raw
    rows = lambda a: jnp.pad(a, [(0, extra)] + [(0, 0)] * (a.ndim - 1))
    return rows(x), rows(y), {k: rows(v) for k, v in raw.items()}


def _local_setup(x, y, raw, spec: LossSpec, axes: Axes):
    tile = spec.tile_for(x.shape[0])
    x, y, raw = _pad(x, y, raw, tile)
    return x, y, T.examples(raw, global_ids(x.shape[0], axes)), tile


def _counts(rows: T.Examples, axes: Axes):
    """(valid images, valid texts) of the global batch."""
    count = lambda valid: psum(jnp.sum(valid, dtype=jnp.float32), axes)
    return count(rows.image_valid), count(rows.text_valid)


def forward_body(x, y, scale, bias, raw, *, spec: LossSpec, axes: Axes, size: int):
    """(global sums, per-example residuals of the backward pass)."""
    x, y, rows, tile = _local_setup(x, y, raw, spec, axes)
    num_images, num_texts = _counts(rows, axes)
    n = x.shape[0]

    def step(payload, col_stats, acc):
        y_block, cols = payload
        row_stats, col_stats, sums = tiles.fold_block(
            x, rows, y_block, cols, scale, bias, acc["rows"], col_stats, acc["sums"],
            spec=spec, tile=tile)
        return col_stats, {"rows": row_stats, "sums": sums}

    zero = jnp.zeros((), jnp.float32)
    names = ("pos_sum", "pos_count", "neg_sum", "neg_count")
    sums0 = {k: zero for k in names + (() if spec.softmax else ("pairs",))}
    col_stats, acc = ring_pass(
        step, (y, rows), tiles.side_stats(n, spec),
        {"rows": tiles.side_stats(n, spec), "sums": sums0}, axes=axes, size=size,
    )
    row_stats, sums = acc["rows"], dict(acc["sums"])
    # This device's images (rows) and, back home after the turn, its texts (columns).
    counted_images = rows.image_valid & (row_stats["target_mass"] > 0)
    counted_texts = rows.text_valid & (col_stats["target_mass"] > 0)
    correct = lambda st, counted: jnp.sum(counted & (st["pos_max"] >= st["max"]),
                                          dtype=jnp.float32)
    sums["correct_i2t"] = correct(row_stats, counted_images)
    sums["correct_t2i"] = correct(col_stats, counted_texts)
    sums["count_i2t"] = jnp.sum(counted_images, dtype=jnp.float32)
    sums["count_t2i"] = jnp.sum(counted_texts, dtype=jnp.float32)
    if spec.softmax:
        sums["i2t"] = tiles.side_loss_sum(row_stats, counted_images, num_texts, spec)
        sums["t2i"] = tiles.side_loss_sum(col_stats, counted_texts, num_images, spec)
        residuals = {
            "row": {"lse": tiles.logsumexp(row_stats), "mass": tiles.safe_mass(row_stats),
                    "counted": counted_images},
            "col": {"lse": tiles.logsumexp(col_stats), "mass": tiles.safe_mass(col_stats),
                    "counted": counted_texts},
        }
    else:
        sums["i2t"] = sums["t2i"] = sums.pop("pairs")
        residuals = {"row": {}, "col": {}}
    sums = {k: psum(v, axes) for k, v in sums.items()}
    sums["images"], sums["texts"] = num_images, num_texts
    return sums, residuals


def backward_body(x, y, scale, bias, raw, residuals, num_images, num_texts, ct_i2t, ct_t2i,
                  *, spec: LossSpec, axes: Axes, size: int):
    """(dx, dy, d scale, d bias) of the sums' i2t / t2i cotangents."""
    local, dtypes = x.shape[0], (x.dtype, y.dtype)
    x, y, rows, tile = _local_setup(x, y, raw, spec, axes)
    inv_images = 1.0 / jnp.maximum(num_images, 1.0)
    inv_texts = 1.0 / jnp.maximum(num_texts, 1.0)

    def step(payload, dy, acc):
        y_block, cols, col_res = payload
        dx, dy, dscalars = tiles.grad_block(
            x, rows, residuals["row"], y_block, cols, col_res, scale, bias, ct_i2t, ct_t2i,
            inv_images, inv_texts, acc["dx"], dy, acc["dscalars"], spec=spec, tile=tile)
        return dy, {"dx": dx, "dscalars": dscalars}

    zero = jnp.zeros((), jnp.float32)
    dy, acc = ring_pass(
        step, (y, rows, residuals["col"]), jnp.zeros(y.shape, jnp.float32),
        {"dx": jnp.zeros(x.shape, jnp.float32), "dscalars": (zero, zero)},
        axes=axes, size=size,
    )
    dscale, dbias = acc["dscalars"]
    return (acc["dx"][:local].astype(dtypes[0]), dy[:local].astype(dtypes[1]),
            psum(dscale, axes), psum(dbias, axes))


def ring_sums(x, y, scale, bias, raw, *, spec: LossSpec, mesh: Mesh | None,
              axes: Axes) -> dict[str, jax.Array]:
    """The global sums of the ring loss, differentiable w.r.t. x, y, scale and bias.

    With `mesh` None (and `axes` None) the whole batch is one device's block.
    """
    size = axes_size(mesh, axes)
    options = dict(spec=spec, axes=axes, size=size)
    rows, rep = P(axes), P()

    def sharded(body, in_specs, out_specs):
        if mesh is None:
            return lambda *a: body(*a, **options)
        return jax.shard_map(lambda *a: body(*a, **options), mesh=mesh, in_specs=in_specs,
                             out_specs=out_specs, check_vma=False)

    @jax.custom_vjp
    def ring(x, y, scale, bias, raw):
        return forward(x, y, scale, bias, raw)[0]

    def forward(x, y, scale, bias, raw):
        sums, residuals = sharded(forward_body, (rows, rows, rep, rep, rows), (rep, rows))(
            x, y, scale, bias, raw)
        return sums, (x, y, scale, bias, raw, residuals, sums["images"], sums["texts"])

    def backward(saved, cts):
        x, y, scale, bias, raw, residuals, num_images, num_texts = saved
        dx, dy, dscale, dbias = sharded(
            backward_body, (rows, rows, rep, rep, rows, rows, rep, rep, rep, rep),
            (rows, rows, rep, rep),
        )(x, y, scale, bias, raw, residuals, num_images, num_texts, cts["i2t"], cts["t2i"])
        return dx, dy, dscale.astype(scale.dtype), dbias.astype(bias.dtype), None

    ring.defvjp(forward, backward)
    return ring(x, y, scale, bias, raw)
