"""The train state and its sharded initialisation (pure; no I/O).

Initialisation never materialises the model on one device: `jax.eval_shape` gives the
abstract state with logical axis names, the rules turn them into shardings, and
`jax.jit(init, out_shardings=...)` creates every parameter where it lives.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from jaxmedclip import batch_schema


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes. `step` is the number of updates applied."""

    step: jax.Array
    params: Any
    opt_state: Any


def dummy_inputs(data_config: ml_collections.ConfigDict, batch: int = 1):
    """Abstract model inputs of the configured shapes (for init and `eval_shape`): the
    `image` and `tokens` fields of `jaxmedclip.batch_schema`."""
    fields = batch_schema.batch_fields(data_config, batch)
    images, tokens = fields["image"], fields["tokens"]
    return jax.ShapeDtypeStruct(*images), jax.ShapeDtypeStruct(*tokens)


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
    model: nn.Module, tx: optax.GradientTransformation, data_config, mesh: Mesh, rules,
    seed: int, shardings: TrainState | None = None,
) -> tuple[TrainState, TrainState]:
    """Initialises the state directly in its sharded layout. Returns (state, shardings).

    `shardings` (from `state_shardings`, e.g. a `Setup`'s) saves tracing the init twice.
    """
    if shardings is None:
        _, shardings = state_shardings(model, tx, data_config, mesh, rules)
    init = jax.jit(
        lambda rng: nn.unbox(_init_boxed(model, tx, data_config, rng)), out_shardings=shardings
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = init(jax.random.key(seed))
    return state, shardings
