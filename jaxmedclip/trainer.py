"""Train state, sharded initialisation and the jitted train step (pure; no I/O).

Initialisation never materialises the model on one device: `jax.eval_shape` gives the
abstract state with logical axis names, the rules turn them into shardings, and
`jax.jit(init, out_shardings=...)` creates every parameter where it lives.

The objective is the global contrastive loss of `config.loss` (`jaxmedclip.losses`),
plus, when `config.loss.local` is set with a weight > 0, the GLoRIA-style local
alignment loss (`jaxmedclip.methods.local_alignment`):

    loss = global + loss.local.weight * local

`loss.local` fields: weight (default 1.0; 0 turns the term off), max_words (words per
text kept by sub-word pooling; default None: the text length), t1, t2, t3, impl
(default: `loss.impl`), i2t_weight, t2i_weight. The term needs the model's local
projections (`model.local_dim`) and the tokenizer's word-start table (`word_starts`).

When `config.loss.multiview` is set (CXR-CLIP), the towers also embed the batch's second
images and texts (`image2`, `tokens2`, from the input pipeline's `data.multiview`) and
the global loss is replaced by the multi-view combination of
`jaxmedclip.methods.multiview` (image-text over the 2x2 pairs, image-image, text-text).
It is not combined with `loss.local` or GradCache (`microbatch_size`).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from jaxmedclip import losses, parallel
from jaxmedclip.methods import local_alignment, multiview

# The model outputs the loss reads per example (the rest, scale and bias, are scalars).
EMBEDDINGS = ("image_emb", "text_emb")
# The batch fields of the second view and text that `loss.multiview` reads.
MULTIVIEW_INPUTS = ("image2", "tokens2")
LOCAL_FEATURES = ("image_local", "text_local")


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


@dataclasses.dataclass(frozen=True)
class LocalTerm:
    """The local alignment term of the objective, read from `config.loss.local`."""

    weight: float
    max_words: int | None
    loss_kwargs: dict[str, Any]  # For `local_alignment.local_alignment_loss`.
    word_starts: np.ndarray  # bool [vocab]: does token id i start a word?

    @classmethod
    def from_config(
        cls, loss_config: ml_collections.ConfigDict, word_starts: Any, model: nn.Module
    ) -> LocalTerm | None:
        """The term, or None when `loss.local` is absent or its weight is 0."""
        local = loss_config.get("local") if loss_config is not None else None
        if local is None:
            return None
        weight = float(local.get("weight", 1.0))
        if weight < 0:
            raise ValueError(f"loss.local.weight={weight} must be >= 0 (0: no local loss)")
        kwargs = local_alignment.local_alignment_config(
            local, default_impl=loss_config.get("impl", "all_gather")
        )
        if weight == 0:
            return None
        max_words = local.get("max_words")
        if max_words is not None and (isinstance(max_words, bool) or int(max_words) <= 0):
            raise ValueError(f"loss.local.max_words={max_words!r} must be a positive integer "
                             "or None (all tokens)")
        if getattr(model, "local_dim", None) is None:
            raise ValueError(
                "loss.local (the local alignment loss) needs the model's local projections of "
                "patch tokens and token features: set model.local_dim (e.g. 128)"
            )
        if word_starts is None:
            raise ValueError(
                "loss.local (the local alignment loss) needs the tokenizer's word-start "
                "table to pool sub-word pieces into words: pass word_starts="
                "local_alignment.word_start_table(pieces) to make_train_step, pieces being "
                "[sp.id_to_piece(i) for i in range(sp.get_piece_size())]"
            )
        word_starts = np.asarray(word_starts)
        if word_starts.ndim != 1 or word_starts.dtype != bool:
            raise ValueError(f"word_starts must be bool [vocab]; got {word_starts.dtype} "
                             f"{word_starts.shape}")
        return cls(weight, None if max_words is None else int(max_words), kwargs, word_starts)

    def loss(self, image_local, text_local, batch, mesh):
        """(local loss, metrics) over the global batch; texts without words are left out,
        and so are examples without an image or a text (`image_mask`, `text_mask`)."""
        words, word_mask = local_alignment.merge_subwords(
            text_local, batch["tokens"], self.word_starts, max_words=self.max_words
        )
        mask = jnp.any(word_mask, axis=1)
        for name in ("mask", "image_mask", "text_mask"):
            if name in batch:
                mask = mask & jnp.asarray(batch[name]).astype(bool)
        return local_alignment.local_alignment_loss(
            image_local, words, word_mask, mask, mesh=mesh, batch_axes=parallel.BATCH_AXES,
            **self.loss_kwargs,
        )


def multiview_enabled(loss_config: ml_collections.ConfigDict | None) -> bool:
    """Whether `loss.multiview` (CXR-CLIP's multi-view terms) is set."""
    return loss_config is not None and loss_config.get("multiview") is not None


def _check_multiview(loss_config, local: LocalTerm | None, microbatch_size) -> bool:
    """Whether the multi-view objective is on, once its settings are known to fit."""
    if not multiview_enabled(loss_config):
        return False
    multiview.MultiviewSpec.from_config(loss_config.multiview)
    if local is not None:
        raise ValueError(
            "loss.multiview and loss.local are not supported together (the local term "
            "would need a choice of view and text); switch one of them off"
        )
    if microbatch_size is not None:
        raise ValueError(
            f"loss.multiview does not support GradCache (microbatch_size={microbatch_size}): "
            "set microbatch_size=None"
        )
    return True


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
    step does). The loss is the objective of the module doc; with the local term the
    metrics also hold `loss/global`, `loss/local`, `local/loss_i2t` and `local/loss_t2i`.
    `word_starts` (bool [vocab], `local_alignment.word_start_table` of the tokenizer's
    pieces) is needed only by the local term and enters the step as a constant.

    With `microbatch_size` the gradients are computed by GradCache (Gao et al., 2021): the
    towers run micro-batch by micro-batch, so activations are held for one micro-batch
    only, while the loss still sees the whole global batch:

    1. embed every micro-batch (forward only, nothing kept for a backward pass);
    2. the loss and its gradient w.r.t. the embeddings, scale and bias, once, on the
       full global batch (every negative is kept);
    3. per micro-batch, run the forward again under `jax.vjp` and pull the cached
       embedding gradients back to the parameters, summing over micro-batches.

    The result equals the full-batch gradient (up to float summation order); the price is
    one extra forward pass. With the local term, the cached "embeddings" also include the
    projected patch tokens and token features of the whole batch (each device holds its
    rows: b * (P + T) * local_dim floats, next to the local loss's own pair computation,
    which is the same as without micro-batches). `param_shardings` (optional) keeps the
    gradient accumulator in the parameters' layout (sharded for FSDP).
    """
    local = LocalTerm.from_config(loss_config, word_starts, model)
    with_views = _check_multiview(loss_config, local, microbatch_size)
    features = EMBEDDINGS + (LOCAL_FEATURES if local is not None else ())

    def global_loss(out, batch):
        """The global contrastive loss, or the multi-view terms (module doc)."""
        if not with_views:
            return losses.contrastive_loss(
                out["image_emb"],
                out["text_emb"],
                out["scale"],
                out["bias"],
                batch,
                config=loss_config,
                mesh=mesh,
                batch_axes=parallel.BATCH_AXES,
            )
        loss, metrics = multiview.multiview_loss(
            (out["image_emb"], out["image_emb2"]),
            (out["text_emb"], out["text_emb2"]),
            out["scale"],
            out["bias"],
            batch,
            config=loss_config,
            mesh=mesh,
            batch_axes=parallel.BATCH_AXES,
        )
        # The (view 1, text 1) pair is the plain CLIP pair: its accuracies stay comparable.
        metrics.update(acc_i2t=metrics["image1_text1/acc_i2t"],
                       acc_t2i=metrics["image1_text1/acc_t2i"])
        return loss, metrics

    def objective(out, batch):
        """The loss of the module doc from the model's outputs (full global batch)."""
        loss, metrics = global_loss(out, batch)
        metrics.update(scale=out["scale"], bias=out["bias"])
        if local is None:
            return loss, metrics
        local_loss, local_metrics = local.loss(out["image_local"], out["text_local"], batch, mesh)
        metrics["loss/global"] = loss
        metrics["loss/local"] = local_loss
        metrics.update({f"local/{k}": v for k, v in local_metrics.items()})
        return loss + local.weight * local_loss, metrics

    def loss_fn(params, batch):
        out = model.apply({"params": params}, batch["image"], batch["tokens"])
        if with_views:
            missing = [k for k in MULTIVIEW_INPUTS if k not in batch]
            if missing:
                raise ValueError(
                    f"loss.multiview needs the batch fields {missing} (a second view and "
                    "text per example): set data.multiview=True"
                )
            second = model.apply({"params": params}, batch["image2"], batch["tokens2"])
            out = {**out, "image_emb2": second["image_emb"], "text_emb2": second["text_emb"]}
        return objective(out, batch)

    full_batch = jax.value_and_grad(loss_fn, has_aux=True)
    if microbatch_size is None:
        return full_batch
    microbatch_size = _check_microbatch_size(microbatch_size, mesh)

    def embed(params, images, tokens):
        out = model.apply({"params": params}, images, tokens)
        return {name: out[name] for name in features}

    def head_loss(params, cached, batch):
        scale, bias = model.apply({"params": params}, method="temperature")
        return objective({**cached, "scale": scale, "bias": bias}, batch)

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
        _, cached = jax.lax.scan(
            lambda carry, xs: (carry, embed(fixed, *xs)), None, (images, tokens)
        )
        cached = jax.tree.map(lambda x: _from_microbatches(x, mesh), cached)

        # 2. The full-batch loss; gradients w.r.t. embeddings and the temperature/bias.
        (loss, metrics), (head_grads, d_cached) = jax.value_and_grad(
            head_loss, argnums=(0, 1), has_aux=True
        )(params, cached, batch)

        # 3. Back-propagate the cached embedding gradients micro-batch by micro-batch.
        def accumulate(grads, xs):
            micro_images, micro_tokens, micro_d_cached = xs
            _, pullback = jax.vjp(lambda p: embed(p, micro_images, micro_tokens), params)
            (micro_grads,) = pullback(micro_d_cached)
            grads = jax.tree.map(lambda g, m: g + m.astype(jnp.float32), grads, micro_grads)
            return constrain(grads), None

        start = constrain(jax.tree.map(lambda g: g.astype(jnp.float32), head_grads))
        grads, _ = jax.lax.scan(
            accumulate, start, (images, tokens, jax.tree.map(split, d_cached))
        )
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
    word_starts: np.ndarray | None = None,
) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """A jitted `train_step(state, batch) -> (state, metrics)`; the state is donated.

    `microbatch_size` (global, `config.microbatch_size`): compute the gradients by
    GradCache over micro-batches of this size (see `make_loss_and_grads`); it must divide
    the global batch and be divisible by the devices of the batch axes.
    `word_starts` (bool [vocab]): the tokenizer's word-start table, needed (only) by the
    local alignment term `loss.local`; see `make_loss_and_grads`.
    """
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
