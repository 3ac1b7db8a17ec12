"""The jitted train step: objective -> gradients (whole batch or GradCache) -> optax."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from jaxmedclip import parallel
from jaxmedclip.training.gradcache import check_microbatch_size, gradcache_loss_and_grads
from jaxmedclip.training.objective import Objective
from jaxmedclip.training.state import TrainState


def make_loss_and_grads(
    model: nn.Module,
    loss_config: ml_collections.ConfigDict,
    mesh: Mesh,
    *,
    microbatch_size: int | None = None,
    param_shardings: Any = None,
    word_starts: np.ndarray | None = None,
) -> Callable[[Any, Mapping[str, jax.Array]], tuple[tuple[jax.Array, dict], Any]]:
    """`loss_and_grads(params, batch) -> ((loss, metrics), grads)` over the global batch.

    Call it under `jax.set_mesh(mesh)` and the model's logical-axis rules (as the train
    step does). The loss is `training.objective`'s; with the local term the metrics also
    hold `loss/global`, `loss/local`, `local/loss_i2t` and `local/loss_t2i`.
    `word_starts` (bool [vocab], `local_alignment.word_start_table` of the tokenizer's
    pieces) is needed only by the local term and enters the step as a constant.

    With `microbatch_size` the gradients come from GradCache (`training.gradcache`): the
    towers run micro-batch by micro-batch while the loss still sees the whole global
    batch. With the local term, the cached "embeddings" also include the projected patch
    tokens and token features of the whole batch (each device holds its rows:
    b * (P + T) * local_dim floats). `param_shardings` (optional) keeps the gradient
    accumulator in the parameters' layout (sharded for FSDP).
    """
    objective = Objective.from_config(model, loss_config, mesh, word_starts=word_starts,
                                      microbatch_size=microbatch_size)
    full_batch = jax.value_and_grad(objective.loss_fn, has_aux=True)
    if microbatch_size is None:
        return full_batch
    return gradcache_loss_and_grads(
        objective.embed_batch, objective.head_loss, full_batch,
        check_microbatch_size(microbatch_size, mesh), mesh, param_shardings, objective.inputs)


def apply_gradients(tx: optax.GradientTransformation, schedule: optax.Schedule,
                    state: TrainState, grads: Any, loss: jax.Array, metrics: dict
                    ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update of `state` by `grads`; the step's logged metrics."""
    with jax.named_scope("optimizer"):  # Profiles group the update by it.
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads),
               "learning_rate": schedule(state.step)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


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
    word_starts: np.ndarray | None = None,
    stream_microbatches: bool = False,
    global_batch_size: int | None = None,
) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """A jitted `train_step(state, batch) -> (state, metrics)`; the state is donated.
    `train_step.from_host(state, host_batch)` takes this process's share of the batch
    (numpy, as the input pipeline yields it).

    `microbatch_size` (global, `config.microbatch_size`): compute the gradients by
    GradCache over micro-batches of this size (see `make_loss_and_grads`); it must divide
    the global batch and be divisible by the devices of the batch axes.
    `word_starts` (bool [vocab]): the tokenizer's word-start table, needed (only) by the
    local alignment term `loss.local`; see `make_loss_and_grads`.
    `stream_microbatches`: the micro-batches are copied from host memory one at a time
    (`training.stream.StreamedStep`, returned instead; needs `global_batch_size`).
    """
    if stream_microbatches:
        from jaxmedclip.training.stream import StreamedStep

        objective = Objective.from_config(model, loss_config, mesh, word_starts=word_starts,
                                          microbatch_size=microbatch_size)
        return StreamedStep(objective, tx, schedule, mesh, rules, shardings, microbatch_size,
                            global_batch_size)
    loss_and_grads = make_loss_and_grads(
        model,
        loss_config,
        mesh,
        microbatch_size=microbatch_size,
        param_shardings=shardings.params,
        word_starts=word_starts,
    )

    def train_step(state: TrainState, batch):
        (loss, metrics), grads = loss_and_grads(state.params, batch)
        return apply_gradients(tx, schedule, state, grads, loss, metrics)

    jitted = jax.jit(
        train_step,
        in_shardings=(shardings, parallel.batch_sharding(mesh)),
        out_shardings=(shardings, NamedSharding(mesh, jax.sharding.PartitionSpec())),
        donate_argnums=(0,),
    )

    def step(state, batch):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted(state, batch)

    def from_host(state, host_batch, should_stop=None):
        return step(state, parallel.host_to_global(host_batch, mesh))

    step.jitted = jitted
    step.schedule = schedule
    # The compiled pieces with abstract arguments (one here; several when streamed).
    step.abstract_pieces = lambda state, batch: {"train_step": (jitted, (state, batch))}
    step.from_host = from_host
    step.takes_device_batches = True  # The loop may prefetch its batches to the devices.
    step.transfer_s = 0.0  # Host-to-device copies are not timed apart from the data.
    return step
