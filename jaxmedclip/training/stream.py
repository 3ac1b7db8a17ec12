"""GradCache streamed from host memory (`stream_microbatches=True`): global batches larger
than device memory.

The in-device GradCache (`training.gradcache`) splits a batch that is already on the
devices, so the whole batch must fit there as input. Here the batch stays in host memory
(as the input pipeline produced it) and only micro-batches and the per-example features
([local batch, d] per device) live on the devices:

1. pass 1, micro-batch after micro-batch: copy it to the devices and embed it (forward
   only, nothing kept for a backward pass) into a preallocated feature buffer
   [M, micro, ...] (donated: written in place);
2. the loss over the whole global batch from the buffer (every negative is kept), its
   gradient w.r.t. the features, the temperature and the bias;
3. pass 2, micro-batch after micro-batch: copy it again, re-run the forward under
   `jax.vjp` and pull its slice of the feature gradient back into a gradient
   accumulator (donated);
4. one optimizer update.

Pass 2 reads the examples pass 1 read from the same host batch: holding the batch costs
host memory (the process's share of the global batch, as the pipeline emits it: float32
images, 4 * S * S bytes per image), but no second decode and augmentation of every
image, which would double the input pipeline's CPU cost at batch sizes where it is
already the bottleneck. Multi-host, each process holds and streams its own share.

Micro-batch k holds the k-th chunk of every device's rows (`gradcache.to_microbatches`'s
layout), so the loss sees the rows in the order of the un-split step and the gradients
equal its gradients up to float summation order. While micro-batch k computes, the copy
of micro-batch k + 1 is already issued (`prefetch`; JAX dispatches both asynchronously).

A preemption (`should_stop`) between micro-batches abandons the step before the update:
the state is untouched (only the buffers are donated) and the loop saves the previous
complete step; resuming recomputes the abandoned step from the same data.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmedclip import parallel
from jaxmedclip.training.gradcache import (
    check_microbatch_size,
    from_microbatches,
    num_microbatches,
    to_microbatches,
)
from jaxmedclip.training.objective import Objective
from jaxmedclip.training.state import TrainState
from jaxmedclip.training.step import apply_gradients

# Batch fields copied micro-batch by micro-batch; the rest of the batch (tokens, labels,
# ids, masks: a few bytes per example) goes to the devices whole, for the loss.
IMAGE_FIELDS = ("image", "image2")


class StepInterrupted(Exception):
    """A preemption request arrived during a streamed step; the state was not updated."""


def check_stream(microbatch_size: Any, global_batch_size: int, mesh: Mesh) -> int:
    """The number of micro-batches, once `microbatch_size` is known to divide the global
    batch and split over the batch devices."""
    if microbatch_size is None:
        shards = parallel.batch_shards(mesh)
        fits = [d for d in range(shards, global_batch_size // 2 + 1, shards)
                if global_batch_size % d == 0][:6]
        raise ValueError(
            "stream_microbatches=True streams micro-batches of microbatch_size from host "
            f"memory, but microbatch_size is None: set microbatch_size (sizes that fit "
            f"global_batch_size={global_batch_size} on {shards} devices: {fits}) or "
            "stream_microbatches=False")
    return num_microbatches(global_batch_size, check_microbatch_size(microbatch_size, mesh),
                            mesh)


class StreamedStep:
    """`step.from_host(state, host_batch) -> (state, metrics)`: one optimizer step on the
    global batch whose process share `host_batch` holds, streamed (module doc)."""

    def __init__(self, objective: Objective, tx: optax.GradientTransformation,
                 schedule: optax.Schedule, mesh: Mesh, rules, shardings: TrainState,
                 microbatch_size: int, global_batch_size: int, *, prefetch: bool = True):
        self.objective, self.tx, self.schedule = objective, tx, schedule
        self.mesh, self.rules, self.shardings = mesh, rules, shardings
        self.num_micro = check_stream(microbatch_size, global_batch_size, mesh)
        self.microbatch_size = global_batch_size // self.num_micro
        self.global_batch_size = global_batch_size
        self.prefetch = prefetch
        self.transfer_s = 0.0  # Host time spent issuing copies, in the last step.
        self._row = parallel.batch_sharding(mesh)
        self._buffer_sharding = NamedSharding(mesh, P(None, parallel.BATCH_AXES))
        self._replicated = NamedSharding(mesh, P())
        self._buffers: dict = {}
        # XLA's in-process CPU collectives (the fake devices of tests and CPU runs) can
        # deadlock when several programs with collectives are in flight: with 8 devices
        # on 2 cores, 4 device threads of one backward piece waited in its all-reduce for
        # the other 4, queued behind them (batch 1,024 in micro-batches of 256). On CPU
        # each piece is waited for before the next one is dispatched; copies still go
        # ahead. Accelerators queue programs per device and need no such wait.
        self._one_at_a_time = jax.default_backend() == "cpu"
        self._build()

    # -- the compiled pieces ------------------------------------------------------------

    def _build(self) -> None:
        objective, mesh, num_micro = self.objective, self.mesh, self.num_micro
        param_shardings = self.shardings.params

        def constrain(grads):
            return jax.lax.with_sharding_constraint(grads, param_shardings)

        def embed_into(params, buffer, k, micro):
            features = objective.embed_batch(jax.lax.stop_gradient(params), micro)
            return {name: jax.lax.dynamic_update_index_in_dim(
                buffer[name], features[name].astype(buffer[name].dtype), k, 0)
                for name in buffer}

        def head(params, buffer, rest):
            features = {name: from_microbatches(x, mesh) for name, x in buffer.items()}
            (loss, metrics), (head_grads, d_features) = jax.value_and_grad(
                objective.head_loss, argnums=(0, 1), has_aux=True)(params, features, rest)
            d_buffer = {name: to_microbatches(d, num_micro, mesh)
                        for name, d in d_features.items()}
            grads = constrain(jax.tree.map(lambda g: g.astype(jnp.float32), head_grads))
            return loss, metrics, grads, d_buffer

        def backward(params, grads, k, micro, d_buffer):
            d_micro = {name: jax.lax.dynamic_index_in_dim(d, k, 0, keepdims=False)
                       for name, d in d_buffer.items()}
            features, pullback = jax.vjp(lambda p: objective.embed_batch(p, micro), params)
            d_micro = {name: d_micro[name].astype(features[name].dtype) for name in features}
            (micro_grads,) = pullback(d_micro)
            return constrain(jax.tree.map(lambda g, m: g + m.astype(jnp.float32), grads,
                                          micro_grads))

        def update(state, grads, loss, metrics):
            grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
            return apply_gradients(self.tx, self.schedule, state, grads, loss, metrics)

        self.embed_into = jax.jit(embed_into, donate_argnums=(1,),
                                  out_shardings=self._buffer_sharding)
        self.head = jax.jit(head, out_shardings=(
            self._replicated, self._replicated, param_shardings, self._buffer_sharding))
        self.backward = jax.jit(backward, donate_argnums=(1,),
                                out_shardings=param_shardings)
        self.update = jax.jit(update, donate_argnums=(0,), out_shardings=(
            self.shardings, self._replicated))

    def buffer_shapes(self, abstract_params, micro: Mapping[str, jax.ShapeDtypeStruct]
                      ) -> dict[str, jax.ShapeDtypeStruct]:
        """The feature buffer [M, micro, ...] of every feature the loss reads."""
        features = jax.eval_shape(self.objective.embed_batch, abstract_params, micro)
        return {name: jax.ShapeDtypeStruct((self.num_micro, *x.shape), x.dtype,
                                           sharding=self._buffer_sharding)
                for name, x in features.items()}

    def abstract_pieces(self, abstract_state: TrainState,
                        abstract_batch: Mapping[str, jax.ShapeDtypeStruct]) -> dict:
        """Each compiled piece with abstract arguments: {name: (jitted, args)}."""
        micro = self._abstract_micro(abstract_batch)
        rest = {name: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self._row)
                for name, x in abstract_batch.items() if name not in IMAGE_FIELDS}
        params = abstract_state.params
        buffer = self.buffer_shapes(params, micro)
        k = jax.ShapeDtypeStruct((), jnp.int32)
        grads = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, jnp.float32,
                                                               sharding=s),
                             params, self.shardings.params)
        loss = jax.ShapeDtypeStruct((), jnp.float32)
        _, metrics, _, _ = jax.eval_shape(self.head, params, buffer, rest)
        return {
            "embed": (self.embed_into, (params, buffer, k, micro)),
            "loss": (self.head, (params, buffer, rest)),
            "backward": (self.backward, (params, grads, k, micro, buffer)),
            "update": (self.update, (abstract_state, grads, loss, metrics)),
        }

    def _abstract_micro(self, batch) -> dict[str, jax.ShapeDtypeStruct]:
        """One micro-batch of `batch`'s tower inputs (arrays or shapes) as shapes."""
        return {name: jax.ShapeDtypeStruct((self.microbatch_size, *batch[name].shape[1:]),
                                           batch[name].dtype, sharding=self._row)
                for name in self.objective.inputs}

    # -- the host side -------------------------------------------------------------------

    def _host_chunks(self, host_batch: Mapping[str, np.ndarray]) -> Callable[[int], dict]:
        """micro-batch k of this process: the k-th chunk of each local device's rows."""
        per_device = self.global_batch_size // parallel.batch_shards(self.mesh)
        chunk = per_device // self.num_micro
        arrays = {name: np.asarray(host_batch[name]) for name in self.objective.inputs}

        def micro(k: int) -> dict[str, jax.Array]:
            t0 = time.perf_counter()
            out = {}
            for name, x in arrays.items():
                rows = x.reshape(x.shape[0] // per_device, self.num_micro, chunk, *x.shape[1:])
                part = np.ascontiguousarray(rows[:, k]).reshape(-1, *x.shape[1:])
                out[name] = jax.make_array_from_process_local_data(self._row, part)
            if not self.prefetch:  # The baseline of the overlap: wait for each copy.
                jax.block_until_ready(out)
            self.transfer_s += time.perf_counter() - t0
            return out

        return micro

    def _stream(self, micro_of: Callable[[int], dict], compute: Callable[[Any, int, dict], Any],
                carry: Any, should_stop: Callable[[], bool] | None, check_every: bool) -> Any:
        """`carry = compute(carry, k, micro-batch k)` for every k; returns the last carry."""
        current = micro_of(0)
        for k in range(self.num_micro):
            carry = compute(carry, k, current)  # Dispatched asynchronously.
            if check_every and should_stop is not None and should_stop():
                raise StepInterrupted
            if k + 1 < self.num_micro:
                if not self.prefetch:  # The baseline: compute, then copy, in turn.
                    jax.block_until_ready(carry)
                current = micro_of(k + 1)  # With prefetch: copied while k computes.
            if self._one_at_a_time:
                jax.block_until_ready(carry)
        return carry

    def from_host(self, state: TrainState, host_batch: Mapping[str, np.ndarray],
                  should_stop: Callable[[], bool] | None = None
                  ) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer step; `should_stop()` (e.g. a preemption request) is asked
        between micro-batches with one process, after pass 1 with several (it must
        answer alike on every process), and raises StepInterrupted before the update."""
        import flax.linen as nn

        self.transfer_s = 0.0
        check_every = jax.process_count() == 1
        micro_of = self._host_chunks(host_batch)
        rest = parallel.host_to_global(
            {k: v for k, v in host_batch.items() if k not in IMAGE_FIELDS}, self.mesh)
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            params = state.params
            micro = self._abstract_micro(host_batch)
            key = tuple((name, x.shape, x.dtype) for name, x in micro.items())
            if key not in self._buffers:  # Traced once per input shape, not every step.
                self._buffers[key] = self.buffer_shapes(params, micro)
            buffer = {name: jnp.zeros(x.shape, x.dtype, device=x.sharding)
                      for name, x in self._buffers[key].items()}

            buffer = self._stream(
                micro_of, lambda buffer, k, micro: self.embed_into(params, buffer, k, micro),
                buffer, should_stop, check_every)
            if should_stop is not None and not check_every and should_stop():
                raise StepInterrupted
            loss, metrics, grads, d_buffer = self.head(params, buffer, rest)
            del buffer  # Its memory is free for pass 2.
            if self._one_at_a_time:
                jax.block_until_ready(grads)
            grads = self._stream(
                micro_of,
                lambda grads, k, micro: self.backward(params, grads, k, micro, d_buffer),
                grads, should_stop, check_every)
            state, metrics = self.update(state, grads, loss, metrics)
            if self._one_at_a_time:
                jax.block_until_ready(state)
            return state, metrics

    def __call__(self, state: TrainState, batch: Mapping[str, Any]):
        """`from_host` for one process holding the whole batch (tests, benchmarks);
        global arrays are fetched to the host first."""
        if jax.process_count() > 1:
            raise ValueError("with several processes call from_host with this process's "
                             "share of the batch")
        return self.from_host(state, {k: np.asarray(jax.device_get(v))
                                      for k, v in batch.items()})
