"""GradCache (Gao et al., 2021): gradients of the global-batch loss with the towers run
micro-batch by micro-batch.

1. embed every micro-batch (forward only, nothing kept for a backward pass);
2. the loss and its gradient w.r.t. the embeddings, scale and bias, once, on the full
   global batch (every negative is kept);
3. per micro-batch, run the forward again under `jax.vjp` and pull the cached embedding
   gradients back to the parameters, summing over micro-batches.

The result equals the full-batch gradient (up to float summation order); the price is
one extra forward pass.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from jaxmedclip import parallel


def check_microbatch_size(microbatch_size: Any, mesh: Mesh) -> int:
    """The micro-batch size as an int, once it is known to split over the batch devices."""
    shards = parallel.batch_shards(mesh)
    try:
        if isinstance(microbatch_size, bool):
            raise TypeError
        microbatch_size = operator.index(microbatch_size)
    except TypeError:
        raise ValueError(
            f"microbatch_size={microbatch_size!r} must be an integer or None"
        ) from None
    if microbatch_size <= 0:
        raise ValueError(
            f"microbatch_size={microbatch_size} must be positive (None: no micro-batching)"
        )
    if microbatch_size % shards:
        fits = shards * max(1, round(microbatch_size / shards))
        raise ValueError(
            f"microbatch_size={microbatch_size} is not divisible by the {shards} devices of "
            f"the batch axes {parallel.BATCH_AXES} (mesh {dict(mesh.shape)}); every "
            f"micro-batch is spread over all of them. e.g. {fits} would fit"
        )
    return microbatch_size


def num_microbatches(global_batch_size: int, microbatch_size: int, mesh: Mesh) -> int:
    """How many micro-batches make the global batch, once `microbatch_size` divides it."""
    if global_batch_size % microbatch_size:
        shards = parallel.batch_shards(mesh)
        fits = [d for d in range(shards, global_batch_size + 1, shards)
                if global_batch_size % d == 0]
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by microbatch_size="
            f"{microbatch_size}; micro-batch sizes that fit: {fits}"
        )
    return global_batch_size // microbatch_size


def to_microbatches(x: jax.Array, num_micro: int, mesh: Mesh) -> jax.Array:
    """[B, ...] -> [num_micro, B / num_micro, ...] without moving data between devices.

    Device d holds rows [d * local, (d + 1) * local) of the batch. Micro-batch k takes the
    k-th chunk of every device's rows, so it is itself spread over all batch devices.
    """
    shards = parallel.batch_shards(mesh)
    size, rest = x.shape[0], x.shape[1:]
    x = x.reshape(shards, num_micro, size // (shards * num_micro), *rest)
    x = jnp.swapaxes(x, 0, 1).reshape(num_micro, size // num_micro, *rest)
    spec = jax.sharding.PartitionSpec(None, parallel.BATCH_AXES)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def from_microbatches(x: jax.Array, mesh: Mesh) -> jax.Array:
    """The inverse of `to_microbatches`: [num_micro, micro, ...] -> [B, ...]."""
    shards = parallel.batch_shards(mesh)
    num_micro, micro, rest = x.shape[0], x.shape[1], x.shape[2:]
    x = x.reshape(num_micro, shards, micro // shards, *rest)
    x = jnp.swapaxes(x, 0, 1).reshape(num_micro * micro, *rest)
    return jax.lax.with_sharding_constraint(x, parallel.batch_sharding(mesh))


def gradcache_loss_and_grads(
    embed: Callable, head_loss: Callable, full_batch: Callable, microbatch_size: int,
    mesh: Mesh, param_shardings: Any = None, input_fields: tuple[str, ...] = ("image", "tokens"),
) -> Callable:
    """`loss_and_grads(params, batch)` by GradCache over micro-batches of `microbatch_size`.

    `embed(params, inputs)` -> the per-example features the loss reads, `inputs` being
    the batch's `input_fields` (images and tokens; with multi-view also the second ones);
    `head_loss(params, features, batch)` -> (loss, metrics) of the whole batch's features;
    `full_batch(params, batch)`: the un-split loss and gradients (used when one
    micro-batch is the whole batch). `param_shardings` (optional) keeps the gradient
    accumulator in the parameters' layout (sharded for FSDP).
    """

    def constrain(grads):
        if param_shardings is None:
            return grads
        return jax.lax.with_sharding_constraint(grads, param_shardings)

    def loss_and_grads(params, batch):
        num_micro = num_microbatches(batch["image"].shape[0], microbatch_size, mesh)
        if num_micro == 1:
            return full_batch(params, batch)
        split = lambda x: to_microbatches(x, num_micro, mesh)
        inputs = {name: split(batch[name]) for name in input_fields}

        # 1. Embeddings of the whole batch; no gradient flows here, so nothing is saved.
        fixed = jax.lax.stop_gradient(params)
        _, cached = jax.lax.scan(lambda carry, xs: (carry, embed(fixed, xs)), None, inputs)
        cached = jax.tree.map(lambda x: from_microbatches(x, mesh), cached)

        # 2. The full-batch loss; gradients w.r.t. embeddings and the temperature/bias.
        (loss, metrics), (head_grads, d_cached) = jax.value_and_grad(
            head_loss, argnums=(0, 1), has_aux=True
        )(params, cached, batch)

        # 3. Back-propagate the cached embedding gradients micro-batch by micro-batch.
        def accumulate(grads, xs):
            micro_inputs, micro_d_cached = xs
            _, pullback = jax.vjp(lambda p: embed(p, micro_inputs), params)
            (micro_grads,) = pullback(micro_d_cached)
            grads = jax.tree.map(lambda g, m: g + m.astype(jnp.float32), grads, micro_grads)
            return constrain(grads), None

        start = constrain(jax.tree.map(lambda g: g.astype(jnp.float32), head_grads))
        grads, _ = jax.lax.scan(accumulate, start, (inputs, jax.tree.map(split, d_cached)))
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        return (loss, metrics), grads

    return loss_and_grads
