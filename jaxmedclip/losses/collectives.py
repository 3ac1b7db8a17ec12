"""Placement and collectives shared by the sharded losses (global and local).

Every function accepts `axes=None` for a loss computed on one device without a mesh:
collectives become identities, so the ring and tile code runs unchanged there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

Axes = tuple[str, ...] | None

_PACKED_WIDTH = 64  # Per-example leaves up to this many values share one transfer.


def batch_axes_of(mesh: Mesh, batch_axes: Sequence[str] | str) -> tuple[str, ...]:
    """`batch_axes` as a tuple of distinct axes of `mesh`, or a ValueError naming them."""
    axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    unknown = [a for a in axes if a not in mesh.axis_names]
    if not axes or unknown or len(set(axes)) != len(axes):
        raise ValueError(
            f"batch_axes={axes} must be distinct axes of the mesh, whose axes are "
            f"{mesh.axis_names}"
        )
    return axes


def axes_size(mesh: Mesh | None, axes: Axes) -> int:
    """Number of devices along `axes` (1 without a mesh)."""
    size = 1
    for axis in axes or ():
        size *= mesh.shape[axis]
    return size


def check_divisible(global_batch: int, shards: int, axes: tuple[str, ...], what: str) -> None:
    if global_batch % shards:
        raise ValueError(
            f"global batch {global_batch} is not divisible by the {shards} devices of the "
            f"batch axes {axes}; pad the batch to a multiple of {shards} and mark the "
            f"padding with {what}"
        )


def place(x: jax.Array, mesh: Mesh, spec: P) -> jax.Array:
    """Gives `x` the sharding shard_map expects when the mesh's axes are Explicit."""
    if AxisType.Explicit in mesh.axis_types:
        return jax.reshard(x, NamedSharding(mesh, spec))
    return x


def replicate_explicit(x: jax.Array) -> jax.Array:
    """Undoes an Explicit-mode batch sharding, for code that works on whole arrays."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    if sharding is not None and any(p is not None for p in sharding.spec):
        return jax.reshard(x, NamedSharding(sharding.mesh, P()))
    return x


def psum(x: Any, axes: Axes) -> Any:
    return x if axes is None else jax.lax.psum(x, axes)


def all_gather(x: jax.Array, axes: Axes) -> jax.Array:
    return x if axes is None else jax.lax.all_gather(x, axes, axis=0, tiled=True)


def global_ids(local: int, axes: Axes) -> jax.Array:
    """int32 [local]: each local example's position in the global batch."""
    offset = 0 if axes is None else jax.lax.axis_index(axes) * local
    return offset + jnp.arange(local, dtype=jnp.int32)


def shift(tree: Any, axes: tuple[str, ...], perm: list[tuple[int, int]]) -> Any:
    """`ppermute` of a pytree of per-example arrays, the small ones packed by dtype.

    A ring step sends a handful of [local] statistics and target fields; one transfer
    per dtype instead of one per array saves per-message latency.
    """
    leaves, treedef = jax.tree.flatten(tree)
    moved = list(leaves)
    groups: dict[Any, list[int]] = {}
    for i, leaf in enumerate(leaves):
        if leaf.size <= _PACKED_WIDTH * leaf.shape[0]:
            groups.setdefault(leaf.dtype, []).append(i)
        else:
            moved[i] = jax.lax.ppermute(leaf, axes, perm)
    for members in groups.values():
        flat = jax.lax.ppermute(
            jnp.concatenate([leaves[i].reshape(-1) for i in members]), axes, perm
        )
        offset = 0
        for i in members:
            moved[i] = flat[offset:offset + leaves[i].size].reshape(leaves[i].shape)
            offset += leaves[i].size
    return jax.tree.unflatten(treedef, moved)


def ring_pass(step: Callable, payload: Any, travel: Any, local: Any, *, axes: Axes,
              size: int) -> tuple[Any, Any]:
    """Visits every device's block once; `travel` rides with its block and ends at home.

    `step(payload, travel, local) -> (travel, local)` scores the visiting block
    `payload` (constant along the way) against this device's rows. The next block is
    sent before the current one is scored, so that transfer can overlap compute.
    """
    if size == 1:
        return step(payload, travel, local)
    perm = [(i, (i + 1) % size) for i in range(size)]
    move = lambda tree: shift(tree, axes, perm)
    incoming = move(payload)
    travel, local = step(payload, travel, local)

    def body(_, carry):
        payload, travel, local = carry
        following = move(payload)
        travel, local = step(payload, move(travel), local)
        return following, travel, local

    payload, travel, local = jax.lax.fori_loop(0, size - 2, body, (incoming, travel, local))
    travel, local = step(payload, move(travel), local)
    return move(travel), local
