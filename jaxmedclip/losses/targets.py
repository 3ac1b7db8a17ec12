"""Targets and per-pair terms shared by every implementation: the batch fields a target
needs, pair affinities, logits, and the global sums -> (loss, metrics) step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxmedclip.losses.spec import LossSpec
from jaxmedclip.vocabulary import NO_FINDING_INDEX

MASKED_LOGIT = -1e9  # Masked columns of a dense softmax: exp() underflows to exactly 0.
SAME_LABELS_COSINE = 1.0 - 1e-6


class Examples(NamedTuple):
    """What the targets of a pair need to know about each side; small next to embeddings."""

    image_valid: jax.Array  # bool [n]: mask & image_mask, the image takes part
    text_valid: jax.Array  # bool [n]: mask & text_mask, the text takes part
    ids: jax.Array  # int32 [n], position in the global batch
    keys: jax.Array | None  # int32 [n, num_keys]: multi-positive keys
    unit_labels: jax.Array | None  # float32 [n, K]: L2-normalised label rows
    labelled: jax.Array | None  # bool [n]: label row is not all zero


def examples(raw: Mapping[str, jax.Array], ids: jax.Array) -> Examples:
    """`Examples` from the packed fields of `raw_targets` and global positions `ids`."""
    unit_labels = labelled = None
    if "labels" in raw:
        labels = raw["labels"].astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(labels * labels, axis=-1, keepdims=True))
        labelled = norm[:, 0] > 0
        unit_labels = labels / jnp.where(norm > 0, norm, 1.0)
    return Examples(
        raw["image_valid"], raw["text_valid"], ids, raw.get("keys"), unit_labels, labelled
    )


def pair_targets(rows: Examples, cols: Examples, spec: LossSpec) -> tuple[jax.Array, jax.Array]:
    """Affinity A (float32) and positive (bool) for every (row, column) pair."""
    same = rows.ids[:, None] == cols.ids[None, :]
    if spec.targets == "one_hot":
        return same.astype(jnp.float32), same
    if spec.targets == "multi_positive":
        match = same
        for k in range(rows.keys.shape[1]):
            match = match | (rows.keys[:, k, None] == cols.keys[None, :, k])
        return match.astype(jnp.float32), match
    cosine = jnp.minimum(
        jnp.matmul(rows.unit_labels, cols.unit_labels.T, precision=jax.lax.Precision.HIGHEST),
        1.0,
    )
    both = rows.labelled[:, None] & cols.labelled[None, :]
    soft = jnp.exp((cosine - 1.0) / spec.soft_target_temperature)
    affinity = jnp.where(same, 1.0, jnp.where(both, soft, 0.0))
    return affinity, same | (both & (cosine >= SAME_LABELS_COSINE))


def matmul(a: jax.Array, b: jax.Array, spec: LossSpec) -> jax.Array:
    """a @ b in float32: exact float32 products, or bfloat16 inputs with float32
    accumulation (`loss.matmul_inputs`)."""
    if spec.matmul_inputs == "bfloat16":
        return jnp.matmul(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16),
                          preferred_element_type=jnp.float32)
    return jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def logits(x: jax.Array, y: jax.Array, scale: jax.Array, bias: jax.Array,
           spec: LossSpec) -> tuple[jax.Array, jax.Array]:
    """(cosines, logits) of rows x against rows y, float32; sigmoid adds the bias."""
    dots = matmul(x, y.T, spec)
    scaled = scale * dots
    return dots, (scaled + bias if not spec.softmax else scaled)


def sigmoid_pair_loss(logits: jax.Array, affinity: jax.Array, spec: LossSpec) -> jax.Array:
    eps = spec.label_smoothing
    target = (1.0 - eps) * affinity + 0.5 * eps
    return -(target * jax.nn.log_sigmoid(logits) + (1 - target) * jax.nn.log_sigmoid(-logits))


def sigmoid_pair_grad(logits: jax.Array, affinity: jax.Array, spec: LossSpec) -> jax.Array:
    eps = spec.label_smoothing
    return jax.nn.sigmoid(logits) - ((1.0 - eps) * affinity + 0.5 * eps)


def pair_logit_sums(logits: jax.Array, positive: jax.Array,
                    valid_pairs: jax.Array) -> dict[str, jax.Array]:
    """Sums and counts of the valid positive and negative pairs' logits (metrics)."""
    logits = jax.lax.stop_gradient(logits)
    pos, neg = valid_pairs & positive, valid_pairs & ~positive
    return {
        "pos_sum": jnp.sum(jnp.where(pos, logits, 0.0)),
        "pos_count": jnp.sum(pos, dtype=jnp.float32),
        "neg_sum": jnp.sum(jnp.where(neg, logits, 0.0)),
        "neg_count": jnp.sum(neg, dtype=jnp.float32),
    }


def target_mass(affinity: jax.Array, col_valid: jax.Array) -> jax.Array:
    """Each row's affinity summed over the valid columns; rows with none are not counted."""
    return jnp.sum(jnp.where(col_valid[None, :], affinity, 0.0), axis=1)


def top1_correct(logits: jax.Array, positive: jax.Array, row_valid: jax.Array,
                 col_valid: jax.Array) -> jax.Array:
    """Rows whose best valid column is a positive (ties count as correct)."""
    logits = jax.lax.stop_gradient(logits)
    best = jnp.max(jnp.where(col_valid[None, :], logits, -jnp.inf), axis=1)
    best_pos = jnp.max(jnp.where(col_valid[None, :] & positive, logits, -jnp.inf), axis=1)
    return row_valid & (best_pos >= best)


def softmax_row_losses(logits: jax.Array, affinity: jax.Array, row_valid: jax.Array,
                       col_valid: jax.Array, count: jax.Array | float,
                       spec: LossSpec) -> jax.Array:
    """Cross-entropy of each row of a whole logit block against its (smoothed) target
    distribution, 0 for rows not counted.

    `row_valid`: the counted rows (valid, with target mass); `count`: the number of
    valid columns, over which label smoothing spreads its mass.
    """
    eps = spec.label_smoothing
    log_probs = jax.nn.log_softmax(jnp.where(col_valid[None, :], logits, MASKED_LOGIT), axis=1)
    weights = jnp.where(col_valid[None, :], affinity, 0.0)
    mass = jnp.sum(weights, axis=1, keepdims=True)
    target = (1 - eps) * weights / jnp.where(mass > 0, mass, 1.0)
    target = target + jnp.where(col_valid[None, :], eps / jnp.maximum(count, 1.0), 0.0)
    nll = -jnp.sum(target * log_probs, axis=1)
    return jnp.where(row_valid, nll, 0.0)


def finish(sums: Mapping[str, jax.Array], spec: LossSpec) -> tuple[jax.Array, dict]:
    """Global sums -> (loss, metrics): the one place each loss says how it is normalised."""
    count_i2t = jnp.maximum(sums["count_i2t"], 1.0)
    count_t2i = jnp.maximum(sums["count_t2i"], 1.0)
    if spec.softmax:
        loss_i2t, loss_t2i = sums["i2t"] / count_i2t, sums["t2i"] / count_t2i
    else:
        # Valid examples per side, averaged: the batch size when every example has both.
        num_examples = jnp.maximum(0.5 * (sums["images"] + sums["texts"]), 1.0)
        loss_i2t = loss_t2i = sums["i2t"] / num_examples
    metric = jax.lax.stop_gradient
    metrics = {
        "loss_i2t": loss_i2t,
        "loss_t2i": loss_t2i,
        "acc_i2t": metric(sums["correct_i2t"] / count_i2t),
        "acc_t2i": metric(sums["correct_t2i"] / count_t2i),
        "logit_pos": metric(sums["pos_sum"] / jnp.maximum(sums["pos_count"], 1.0)),
        "logit_neg": metric(sums["neg_sum"] / jnp.maximum(sums["neg_count"], 1.0)),
    }
    if spec.softmax:
        loss = spec.i2t_weight * loss_i2t + spec.t2i_weight * loss_t2i
    else:
        loss = loss_i2t
    return loss, metrics


def scalar(value: Any, what: str) -> jax.Array:
    value = jnp.asarray(value)
    if value.size != 1:
        raise ValueError(f"{what} must be a scalar; got shape {value.shape}")
    return value.reshape(()).astype(jnp.float32)


def raw_targets(batch: Mapping[str, jax.Array], size: int, spec: LossSpec) -> dict:
    """Checks the batch fields the targets need and packs them as {image_valid,
    text_valid, keys?, labels?}, one row per example of the global batch."""

    def field(name: str, ndim: int, what: str) -> jax.Array:
        if name not in batch:
            raise ValueError(
                f"loss.targets={spec.targets!r} needs batch[{name!r}] ({what}); the batch "
                f"has {sorted(batch)}"
            )
        value = jnp.asarray(batch[name])
        if value.ndim != ndim or value.shape[0] != size:
            raise ValueError(
                f"batch[{name!r}] must be {what} for a global batch of {size}; got shape "
                f"{value.shape}"
            )
        return value

    def flags(name: str, what: str) -> jax.Array:
        if name not in batch:
            return jnp.ones((size,), bool)
        value = jnp.asarray(batch[name])
        if value.shape != (size,):
            raise ValueError(
                f"batch[{name!r}] must be bool [{size}] (one flag per example of the global "
                f"batch: {what}); got shape {value.shape}"
            )
        return value.astype(bool)

    mask = flags("mask", "False for padding")
    raw = {
        "image_valid": mask & flags("image_mask", "False where the image is absent"),
        "text_valid": mask & flags("text_mask", "False where the text is absent"),
    }
    if spec.targets == "multi_positive":
        keys = []
        for name in spec.multi_positive_key:
            if name == "no_finding":
                labels = field("labels", 2, f"float [{size}, num_labels]")
                if labels.shape[1] <= NO_FINDING_INDEX:
                    raise ValueError(
                        f"multi_positive_key 'no_finding' reads column {NO_FINDING_INDEX} of "
                        f"batch['labels'] ('No Finding'); got shape {labels.shape}")
                # -1 for every normal example; else its position, which matches no other.
                normal = labels[:, NO_FINDING_INDEX] == 1
                keys.append(jnp.where(normal, -1, jnp.arange(size, dtype=jnp.int32)))
                continue
            key = field(name, 1, f"int [{size}], one id per example")
            if not jnp.issubdtype(key.dtype, jnp.integer):
                raise ValueError(f"batch[{name!r}] must hold integer ids; got {key.dtype}")
            keys.append(key.astype(jnp.int32))
        raw["keys"] = jnp.stack(keys, axis=1)
    elif spec.targets == "soft_labels":
        labels = field("labels", 2, f"float [{size}, num_labels]")
        if labels.shape[1] == 0:
            raise ValueError("batch['labels'] has no label columns; soft_labels needs some")
        raw["labels"] = labels.astype(jnp.float32)
    return raw
