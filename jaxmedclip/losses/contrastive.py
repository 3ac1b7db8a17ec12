"""`contrastive_loss`: checks its inputs, places them on the mesh and picks the
implementation named by `config.loss` (see the package docstring for the semantics)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxmedclip.losses import targets as T
from jaxmedclip.losses.all_gather import all_gather_body
from jaxmedclip.losses.collectives import (
    axes_size,
    batch_axes_of,
    check_divisible,
    place,
    replicate_explicit,
)
from jaxmedclip.losses.dense import dense_sums
from jaxmedclip.losses.ring import ring_sums
from jaxmedclip.losses.spec import LossSpec


def contrastive_loss(
    image_emb: jax.Array,
    text_emb: jax.Array,
    scale: jax.Array,
    bias: jax.Array | None,
    batch: Mapping[str, jax.Array],
    *,
    config: LossSpec | ml_collections.ConfigDict | Mapping[str, Any],
    mesh: Mesh | None,
    batch_axes: Sequence[str] | str,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss named by `config` on L2-normalised [B, D] embeddings -> (loss, metrics).

    `scale` multiplies the cosine similarities (already exponentiated and clamped);
    `bias` is added by the sigmoid loss (unused by softmax, may be None there). `batch`
    holds the per-example validity flags (`mask`, `image_mask`, `text_mask`; each
    optional, all True when absent) and target fields (`study_id`, `text_id`, `labels`)
    as global arrays. With a mesh, the batch dimension is sharded over `batch_axes`.
    `config` is `config.loss` or the `LossSpec` read from it.
    """
    spec = config if isinstance(config, LossSpec) else LossSpec.from_config(config)
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(
            f"image and text embeddings must both be [batch, dim] with the same shape; got "
            f"{image_emb.shape} and {text_emb.shape}"
        )
    size = image_emb.shape[0]
    scale = T.scalar(scale, "scale")
    if spec.softmax:
        bias = jnp.zeros((), jnp.float32)  # Softmax is shift invariant: no bias gradient.
    elif bias is None:
        raise ValueError("the sigmoid loss needs a bias; got bias=None")
    else:
        bias = T.scalar(bias, "bias")
    raw = T.raw_targets(batch, size, spec)

    if mesh is None or spec.impl == "dense":
        args = jax.tree.map(replicate_explicit, (image_emb, text_emb, scale, bias, raw))
        if spec.tile_size:  # One device, tiled: the ring code with a single block.
            return T.finish(ring_sums(*args, spec=spec, mesh=None, axes=None), spec)
        return T.finish(dense_sums(*args, spec), spec)

    axes = batch_axes_of(mesh, batch_axes)
    check_divisible(size, axes_size(mesh, axes), axes, "batch['mask']")
    rows, rep = P(axes), P()
    image_emb, text_emb = place(image_emb, mesh, rows), place(text_emb, mesh, rows)
    scale, bias = place(scale, mesh, rep), place(bias, mesh, rep)
    raw = {k: place(v, mesh, rows) for k, v in raw.items()}
    if spec.impl == "all_gather":
        sums = jax.shard_map(
            lambda *a: all_gather_body(*a, spec=spec, axes=axes),
            mesh=mesh, in_specs=(rows, rows, rep, rep, rows), out_specs=rep, check_vma=False,
        )(image_emb, text_emb, scale, bias, raw)
    else:
        sums = ring_sums(image_emb, text_emb, scale, bias, raw, spec=spec, mesh=mesh, axes=axes)
    return T.finish(sums, spec)
