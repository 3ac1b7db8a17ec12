"""Train state, sharded initialisation and the jitted train step (pure; no I/O).

Initialisation never materialises the model on one device: `jax.eval_shape` gives the
abstract state with logical axis names, the rules turn them into shardings, and
`jax.jit(init, out_shardings=...)` creates every parameter where it lives.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding

from jaxmedclip import losses, parallel


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes. `step` is the number of updates applied."""

    step: jax.Array
    params: Any
    opt_state: Any


def dummy_inputs(data_config: ml_collections.ConfigDict, batch: int = 1):
    """Abstract model inputs of the configured shapes (for init and `eval_shape`)."""
    size = data_config.image_size
    channels = data_config.get("num_channels", 1)
    images = jax.ShapeDtypeStruct((batch, size, size, channels), jnp.float32)
    tokens = jax.ShapeDtypeStruct((batch, data_config.max_text_len), jnp.int32)
    return images, tokens


def _unbox_empty(tree):
    """Removes the logical-axis box around subtrees without arrays.

    Masked optimizer states (frozen params) hold an empty `MaskedNode` inside the param's
    box; left boxed it would get a sharding of its own, and the shardings tree would no
    longer have the structure of the unboxed state.
    """
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
    unbox = lambda x: x.unbox() if is_box(x) and not jax.tree.leaves(x.unbox()) else x
    return jax.tree.map(unbox, tree, is_leaf=is_box)


def _init_boxed(model: nn.Module, tx: optax.GradientTransformation, data_config, rng):
    images, tokens = dummy_inputs(data_config)
    variables = model.init(
        rng, jnp.zeros(images.shape, images.dtype), jnp.zeros(tokens.shape, tokens.dtype)
    )
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=_unbox_empty(tx.init(params))
    )


def state_shardings(
    model: nn.Module, tx: optax.GradientTransformation, data_config, mesh: Mesh, rules
) -> tuple[TrainState, TrainState]:
    """(abstract unboxed state, its NamedShardings) from the parameters' logical axes."""
    abstract = jax.eval_shape(
        lambda rng: _init_boxed(model, tx, data_config, rng), jax.random.key(0)
    )
    specs = nn.get_partition_spec(abstract)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    return nn.unbox(abstract), shardings


def create_train_state(
    model: nn.Module, tx: optax.GradientTransformation, data_config, mesh: Mesh, rules, seed: int
) -> tuple[TrainState, TrainState]:
    """Initialises the state directly in its sharded layout. Returns (state, shardings)."""
    _, shardings = state_shardings(model, tx, data_config, mesh, rules)
    init = jax.jit(
        lambda rng: nn.unbox(_init_boxed(model, tx, data_config, rng)), out_shardings=shardings
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = init(jax.random.key(seed))
    return state, shardings


def _check_microbatch_size(microbatch_size: Any, mesh: Mesh) -> int:
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


def _to_microbatches(x: jax.Array, num_micro: int, mesh: Mesh) -> jax.Array:
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


def _from_microbatches(x: jax.Array, mesh: Mesh) -> jax.Array:
    """The inverse of `_to_microbatches`: [num_micro, micro, ...] -> [B, ...]."""
    shards = parallel.batch_shards(mesh)
    num_micro, micro, rest = x.shape[0], x.shape[1], x.shape[2:]
    x = x.reshape(num_micro, shards, micro // shards, *rest)
    x = jnp.swapaxes(x, 0, 1).reshape(num_micro * micro, *rest)
    return jax.lax.with_sharding_constraint(x, parallel.batch_sharding(mesh))


def make_loss_and_grads(
    model: nn.Module,
    loss_config: ml_collections.ConfigDict,
    mesh: Mesh,
    *,
    microbatch_size: int | None = None,
    param_shardings: Any = None,
) -> Callable[[Any, Mapping[str, jax.Array]], tuple[tuple[jax.Array, dict], Any]]:
    """`loss_and_grads(params, batch) -> ((loss, metrics), grads)` over the global batch.

    Call it under `jax.set_mesh(mesh)` and the model's logical-axis rules (as the train
    step does). With `microbatch_size` the gradients are computed by GradCache (Gao et
    al., 2021): the towers run micro-batch by micro-batch, so activations are held for
    one micro-batch only, while the loss still sees the whole global batch:

    1. embed every micro-batch (forward only, nothing kept for a backward pass);
    2. the loss and its gradient w.r.t. the embeddings, scale and bias, once, on the
       full global batch (every negative is kept);
    3. per micro-batch, run the forward again under `jax.vjp` and pull the cached
       embedding gradients back to the parameters, summing over micro-batches.

    The result equals the full-batch gradient (up to float summation order); the price is
    one extra forward pass. `param_shardings` (optional) keeps the gradient accumulator
    in the parameters' layout (sharded for FSDP).
    """

    def contrastive(image_emb, text_emb, scale, bias, batch):
        loss, metrics = losses.contrastive_loss(
            image_emb,
            text_emb,
            scale,
            bias,
            batch,
            config=loss_config,
            mesh=mesh,
            batch_axes=parallel.BATCH_AXES,
        )
        metrics.update(scale=scale, bias=bias)
        return loss, metrics

    def loss_fn(params, batch):
        out = model.apply({"params": params}, batch["image"], batch["tokens"])
        return contrastive(out["image_emb"], out["text_emb"], out["scale"], out["bias"], batch)

    full_batch = jax.value_and_grad(loss_fn, has_aux=True)
    if microbatch_size is None:
        return full_batch
    microbatch_size = _check_microbatch_size(microbatch_size, mesh)

    def embed(params, images, tokens):
        variables = {"params": params}
        return (
            model.apply(variables, images, method="encode_image"),
            model.apply(variables, tokens, method="encode_text"),
        )

    def head_loss(params, image_emb, text_emb, batch):
        scale, bias = model.apply({"params": params}, method="temperature")
        return contrastive(image_emb, text_emb, scale, bias, batch)

    def constrain(grads):
        if param_shardings is None:
            return grads
        return jax.lax.with_sharding_constraint(grads, param_shardings)

    def gradcache(params, batch):
        size = batch["image"].shape[0]
        if size % microbatch_size:
            shards = parallel.batch_shards(mesh)
            fits = [d for d in range(shards, size + 1, shards) if size % d == 0]
            raise ValueError(
                f"global_batch_size={size} is not divisible by microbatch_size="
                f"{microbatch_size}; micro-batch sizes that fit: {fits}"
            )
        num_micro = size // microbatch_size
        if num_micro == 1:
            return full_batch(params, batch)
        split = lambda x: _to_microbatches(x, num_micro, mesh)
        images, tokens = split(batch["image"]), split(batch["tokens"])

        # 1. Embeddings of the whole batch; no gradient flows here, so nothing is saved.
        fixed = jax.lax.stop_gradient(params)
        _, (image_emb, text_emb) = jax.lax.scan(
            lambda carry, xs: (carry, embed(fixed, *xs)), None, (images, tokens)
        )
        image_emb = _from_microbatches(image_emb, mesh)
        text_emb = _from_microbatches(text_emb, mesh)

        # 2. The full-batch loss; gradients w.r.t. embeddings and the temperature/bias.
        (loss, metrics), (head_grads, d_image, d_text) = jax.value_and_grad(
            head_loss, argnums=(0, 1, 2), has_aux=True
        )(params, image_emb, text_emb, batch)

        # 3. Back-propagate the cached embedding gradients micro-batch by micro-batch.
        def accumulate(grads, xs):
            micro_images, micro_tokens, micro_d_image, micro_d_text = xs
            _, pullback = jax.vjp(lambda p: embed(p, micro_images, micro_tokens), params)
            (micro_grads,) = pullback((micro_d_image, micro_d_text))
            grads = jax.tree.map(lambda g, m: g + m.astype(jnp.float32), grads, micro_grads)
            return constrain(grads), None

        start = constrain(jax.tree.map(lambda g: g.astype(jnp.float32), head_grads))
        grads, _ = jax.lax.scan(accumulate, start, (images, tokens, split(d_image), split(d_text)))
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        return (loss, metrics), grads

    return gradcache


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    loss_config: ml_collections.ConfigDict,
    mesh: Mesh,
    rules,
    shardings: TrainState,
    *,
    microbatch_size: int | None = None,
) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """A jitted `train_step(state, batch) -> (state, metrics)`; the state is donated.

    `microbatch_size` (global, `config.microbatch_size`): compute the gradients by
    GradCache over micro-batches of this size (see `make_loss_and_grads`); it must divide
    the global batch and be divisible by the devices of the batch axes.
    """
    loss_and_grads = make_loss_and_grads(
        model,
        loss_config,
        mesh,
        microbatch_size=microbatch_size,
        param_shardings=shardings.params,
    )

    def train_step(state: TrainState, batch):
        (loss, metrics), grads = loss_and_grads(state.params, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics.update(
            loss=loss,
            grad_norm=optax.tree.norm(grads),
            learning_rate=schedule(state.step),
        )
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    jitted = jax.jit(
        train_step,
        in_shardings=(shardings, parallel.batch_sharding(mesh)),
        out_shardings=(shardings, NamedSharding(mesh, jax.sharding.PartitionSpec())),
        donate_argnums=(0,),
    )

    def step(state, batch):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted(state, batch)

    step.jitted = jitted
    return step
