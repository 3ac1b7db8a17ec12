"""Train state, sharded initialisation and the jitted train step (pure; no I/O).

Initialisation never materialises the model on one device: `jax.eval_shape` gives the
abstract state with logical axis names, the rules turn them into shardings, and
`jax.jit(init, out_shardings=...)` creates every parameter where it lives.
"""

from __future__ import annotations

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


def _init_boxed(model: nn.Module, tx: optax.GradientTransformation, data_config, rng):
    images, tokens = dummy_inputs(data_config)
    variables = model.init(
        rng, jnp.zeros(images.shape, images.dtype), jnp.zeros(tokens.shape, tokens.dtype)
    )
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


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


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    loss_config: ml_collections.ConfigDict,
    mesh: Mesh,
    rules,
    shardings: TrainState,
) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """A jitted `train_step(state, batch) -> (state, metrics)`; the state is donated."""

    def loss_fn(params, batch):
        out = model.apply({"params": params}, batch["image"], batch["tokens"])
        loss, metrics = losses.contrastive_loss(
            out["image_emb"],
            out["text_emb"],
            out["scale"],
            out["bias"],
            batch,
            config=loss_config,
            mesh=mesh,
            batch_axes=parallel.BATCH_AXES,
        )
        metrics.update(scale=out["scale"], bias=out["bias"])
        return loss, metrics

    def train_step(state: TrainState, batch):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
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
