"""Contrastive image-report losses whose negatives come from the whole global batch.

Embeddings arrive as global `jax.Array`s sharded over the mesh's batch axes. Three
implementations compute the same numbers:

- `dense`: plain jnp on the global [B, B] logit matrix; the reference the tests use.
- `all_gather`: under `shard_map`, each device gathers the other side's embeddings (and
  the small per-example target information) and scores its local rows against the
  global batch. Memory per device grows with the global batch ([local, B] logits).
- `ring`: the text block and its target information travel around the ring of devices
  (`ppermute`), so each step scores a [local, local] block. Softmax rows use a streaming
  log-sum-exp; column (text->image) statistics travel with their text block and arrive
  home after a full turn. The backward pass is a second ring (`custom_vjp`) that
  recomputes each block's logits; the gradient of a visiting text block travels with
  it. No device holds more than one [local, local] block, so peak memory per device
  does not grow with the number of devices.

Config (`config.loss`, read with defaults so older configs keep working):
  name: "softmax" (symmetric InfoNCE) | "sigmoid" (SigLIP). Default "softmax".
  impl: "dense" | "all_gather" | "ring". Default "all_gather". Without a mesh: dense.
  targets: "one_hot" | "multi_positive" | "soft_labels". Default "one_hot".
  multi_positive_key: one or more of "study_id", "text_id", "no_finding" (a tuple, or
    "study_id,text_id"): two examples are positives of each other if any of these keys
    match. "study_id" and "text_id" are batch fields; "no_finding" is read from
    `batch["labels"]`: every two examples labelled "No Finding" (label 1) match, since
    two normal studies are not negatives of each other whatever their reports' wording
    (other examples get no match from it). Default "study_id".
  soft_target_temperature: T of the MedCLIP-style soft targets. Default 0.1.
  label_smoothing: epsilon in [0, 1). Default 0.
  i2t_weight, t2i_weight: weights of the two softmax directions. Default 0.5 each.

Semantics (every implementation computes exactly these):
  Logits are `scale * <image_i, text_j>` in float32 (plus `bias` for sigmoid). Each
  side of an example has its own validity: image i is valid if `mask[i]` and
  `image_mask[i]`, text j if `mask[j]` and `text_mask[j]` (`mask` False: a padded
  example of an evaluation batch; `image_mask` False: a text-label example, a report
  whose image is absent; each field defaults to all True). A pair (i, j) is valid only
  if image i and text j are both valid; an invalid image is neither a query nor a
  candidate, and likewise an invalid text. N_img and N_txt are the global numbers of
  valid images and texts (both N, the number of valid examples, when every example has
  both sides).

  Pair affinity A[i, j] (symmetric, A[i, i] = 1, computed per pair from per-example
  information, so it is the same wherever the pair is scored):
    one_hot:        1 on the diagonal, else 0.
    multi_positive: 1 if i == j or any `multi_positive_key` field matches, else 0.
    soft_labels:    exp((cos(labels_i, labels_j) - 1) / T), the cosine of the
                    CheXpert-style `labels` rows (1/0/-1, blank 0). An all-zero label row
                    carries no label information: its pairs with other examples get
                    A = 0 (a plain negative) and its own pair A = 1, so its target is
                    one-hot. `labels_present` is not used (blanks are already 0).
  Positives (for the metrics): A[i, j] = 1 for one_hot / multi_positive; for soft_labels
  the pair itself and pairs whose label rows point the same way (cosine >= 1 - 1e-6).

  Target mass of image i: M[i] = sum of A[i, j] over valid texts j; of text j: the sum
  of A[i, j] over valid images i. An image (text) with zero target mass has no target
  in the other side (e.g. one_hot when its partner is masked, or soft_labels when its
  label row is blank and its partner is masked); it is left out of its direction's loss
  and metrics, though it still serves as a candidate (a negative) of the other direction.
  The counted images are the valid ones with M > 0 (C_i2t of them), likewise the counted
  texts (C_t2i). Without per-side masks every valid example is counted: C = N.

  softmax: image->text row i is the cross-entropy between softmax_j(logits[i, :]) over
    valid texts and the target row P[i, j] = A[i, j] / M[i] (for soft_labels this is
    softmax_j(cos / T), the MedCLIP target), mixed with the uniform distribution over
    valid texts by label smoothing: (1 - eps) P + eps / N_txt. text->image is the same
    on columns (over valid images, eps / N_img). loss_i2t averages over the C_i2t counted
    images, loss_t2i over the C_t2i counted texts;
    loss = i2t_weight * loss_i2t + t2i_weight * loss_t2i.
  sigmoid: every valid pair is an independent binary term with target t = A[i, j] (1
    for positives, 0 for negatives; for soft_labels the softmax target row rescaled so
    that its maximum, the pair itself, is 1), smoothed to (1 - eps) t + eps / 2. The sum
    is divided by the mean number of valid examples per side, (N_img + N_txt) / 2
    (SigLIP's batch size N when every example has both sides):
      loss = -sum_valid_pairs [t log sigmoid(l) + (1 - t) log sigmoid(-l)]
             / ((N_img + N_txt) / 2).
    Images and texts without target mass still take part. Both directions are the same
    matrix: loss_i2t = loss_t2i = loss; the direction weights do not apply.

Metrics (replicated scalars from the same pass; no gradient flows through them except
the two losses): loss_i2t, loss_t2i; acc_i2t, acc_t2i: fraction of the counted images
(texts) whose highest-scoring valid partner is a positive (ties count as correct; for
soft_labels a counted text may have no positive partner and then counts as wrong);
logit_pos, logit_neg: mean logit of valid positive and negative pairs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from input_pipeline.findings import CHEXPERT_FINDINGS

LOSSES = ("softmax", "sigmoid")
IMPLEMENTATIONS = ("dense", "all_gather", "ring")
TARGETS = ("one_hot", "multi_positive", "soft_labels")
MULTI_POSITIVE_KEYS = ("study_id", "text_id", "no_finding")
_NO_FINDING = CHEXPERT_FINDINGS.index("No Finding")  # Its column in `labels`.

_MASKED_LOGIT = -1e9  # Masked columns in the dense softmax: exp() underflows to exactly 0.
_SAME_LABELS_COSINE = 1.0 - 1e-6


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """The validated contents of the `loss` config (see the module docstring)."""

    name: str = "softmax"
    impl: str = "all_gather"
    targets: str = "one_hot"
    multi_positive_key: tuple[str, ...] = ("study_id",)
    soft_target_temperature: float = 0.1
    label_smoothing: float = 0.0
    i2t_weight: float = 0.5
    t2i_weight: float = 0.5

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict | Mapping[str, Any]) -> LossSpec:
        """Reads and checks `config.loss`; missing fields take the defaults above."""
        get = lambda name: config.get(name, getattr(cls, name))
        keys = get("multi_positive_key")
        if isinstance(keys, str):
            keys = tuple(k.strip() for k in keys.split(",") if k.strip())
        spec = cls(
            name=get("name"),
            impl=get("impl"),
            targets=get("targets"),
            multi_positive_key=tuple(keys),
            soft_target_temperature=float(get("soft_target_temperature")),
            label_smoothing=float(get("label_smoothing")),
            i2t_weight=float(get("i2t_weight")),
            t2i_weight=float(get("t2i_weight")),
        )
        spec.validate()
        return spec

    def validate(self) -> None:
        def choose(field: str, value: Any, options: Sequence[str]) -> None:
            if value not in options:
                raise ValueError(f"loss.{field}={value!r} is unknown; choose one of {options}")

        choose("name", self.name, LOSSES)
        choose("impl", self.impl, IMPLEMENTATIONS)
        choose("targets", self.targets, TARGETS)
        if not self.multi_positive_key:
            raise ValueError(
                f"loss.multi_positive_key is empty; use one or both of {MULTI_POSITIVE_KEYS}"
            )
        for key in self.multi_positive_key:
            choose("multi_positive_key", key, MULTI_POSITIVE_KEYS)
        if not self.soft_target_temperature > 0:
            raise ValueError(
                f"loss.soft_target_temperature={self.soft_target_temperature} must be > 0"
            )
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"loss.label_smoothing={self.label_smoothing} must be in [0, 1)")

    @property
    def softmax(self) -> bool:
        return self.name == "softmax"


# ----------------------------------------------------------------------------------------
# Per-example target information and pair targets (shared by every implementation).


class _Examples(NamedTuple):
    """What the targets of a pair need to know about each side; small next to embeddings."""

    image_valid: jax.Array  # bool [n]: mask & image_mask, the image takes part
    text_valid: jax.Array  # bool [n]: mask & text_mask, the text takes part
    ids: jax.Array  # int32 [n], position in the global batch
    keys: jax.Array | None  # int32 [n, num_keys]: multi-positive keys
    unit_labels: jax.Array | None  # float32 [n, K]: L2-normalised label rows
    labelled: jax.Array | None  # bool [n]: label row is not all zero


def _examples(raw: Mapping[str, jax.Array], ids: jax.Array) -> _Examples:
    unit_labels = labelled = None
    if "labels" in raw:
        labels = raw["labels"].astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(labels * labels, axis=-1, keepdims=True))
        labelled = norm[:, 0] > 0
        unit_labels = labels / jnp.where(norm > 0, norm, 1.0)
    return _Examples(
        raw["image_valid"], raw["text_valid"], ids, raw.get("keys"), unit_labels, labelled
    )


def _pair_targets(
    rows: _Examples, cols: _Examples, spec: LossSpec
) -> tuple[jax.Array, jax.Array]:
    """Affinity A (float32) and positive (bool) for every (row, column) pair."""
    same = rows.ids[:, None] == cols.ids[None, :]
    if spec.targets == "one_hot":
        return same.astype(jnp.float32), same
    if spec.targets == "multi_positive":
        match = same
        for k in range(rows.keys.shape[1]):
            match = match | (rows.keys[:, k, None] == cols.keys[None, :, k])
        return match.astype(jnp.float32), match
    cosine = jnp.minimum(rows.unit_labels @ cols.unit_labels.T, 1.0)
    both = rows.labelled[:, None] & cols.labelled[None, :]
    soft = jnp.exp((cosine - 1.0) / spec.soft_target_temperature)
    affinity = jnp.where(same, 1.0, jnp.where(both, soft, 0.0))
    return affinity, same | (both & (cosine >= _SAME_LABELS_COSINE))


def _logits(x32, y32, scale, bias, spec):
    dots = x32 @ y32.T
    logits = scale * dots
    return dots, (logits + bias if not spec.softmax else logits)


def _sigmoid_pair_loss(logits, affinity, spec):
    eps = spec.label_smoothing
    target = (1.0 - eps) * affinity + 0.5 * eps
    return -(target * jax.nn.log_sigmoid(logits) + (1 - target) * jax.nn.log_sigmoid(-logits))


def _sigmoid_pair_grad(logits, affinity, spec):
    eps = spec.label_smoothing
    return jax.nn.sigmoid(logits) - ((1.0 - eps) * affinity + 0.5 * eps)


# ----------------------------------------------------------------------------------------
# Global sums -> loss and metrics (shared).

def _finish(sums: Mapping[str, jax.Array], spec: LossSpec):
    count_i2t = jnp.maximum(sums["count_i2t"], 1.0)
    count_t2i = jnp.maximum(sums["count_t2i"], 1.0)
    if spec.softmax:
        loss_i2t, loss_t2i = sums["i2t"] / count_i2t, sums["t2i"] / count_t2i
    else:
        # Valid examples per side, averaged: the batch size when every example has both.
        examples = jnp.maximum(0.5 * (sums["images"] + sums["texts"]), 1.0)
        loss_i2t = loss_t2i = sums["i2t"] / examples
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


def _pair_logit_sums(logits, positive, valid_pairs):
    logits = jax.lax.stop_gradient(logits)
    pos, neg = valid_pairs & positive, valid_pairs & ~positive
    return {
        "pos_sum": jnp.sum(jnp.where(pos, logits, 0.0)),
        "pos_count": jnp.sum(pos, dtype=jnp.float32),
        "neg_sum": jnp.sum(jnp.where(neg, logits, 0.0)),
        "neg_count": jnp.sum(neg, dtype=jnp.float32),
    }


def _target_mass(affinity, col_valid):
    """Each row's affinity summed over the valid columns; rows with none are not counted."""
    return jnp.sum(jnp.where(col_valid[None, :], affinity, 0.0), axis=1)


def _top1_correct(logits, positive, row_valid, col_valid):
    """Rows whose best valid column is a positive (ties count as correct)."""
    logits = jax.lax.stop_gradient(logits)
    best = jnp.max(jnp.where(col_valid[None, :], logits, -jnp.inf), axis=1)
    best_pos = jnp.max(jnp.where(col_valid[None, :] & positive, logits, -jnp.inf), axis=1)
    return row_valid & (best_pos >= best)


def _softmax_row_losses(logits, affinity, row_valid, col_valid, count, spec):
    """Cross-entropy of each row against its (smoothed) target distribution.

    `row_valid`: the counted rows (valid, with target mass); `count`: the number of
    valid columns, over which label smoothing spreads its mass.
    """
    eps = spec.label_smoothing
    log_probs = jax.nn.log_softmax(jnp.where(col_valid[None, :], logits, _MASKED_LOGIT), axis=1)
    weights = jnp.where(col_valid[None, :], affinity, 0.0)
    mass = jnp.sum(weights, axis=1, keepdims=True)
    target = (1 - eps) * weights / jnp.where(mass > 0, mass, 1.0)
    target = target + jnp.where(col_valid[None, :], eps / jnp.maximum(count, 1.0), 0.0)
    nll = -jnp.sum(target * log_probs, axis=1)
    return jnp.where(row_valid, nll, 0.0)


# ----------------------------------------------------------------------------------------
# dense: the reference.


def _dense_sums(x, y, scale, bias, raw, spec):
    x32, y32 = x.astype(jnp.float32), y.astype(jnp.float32)
    examples = _examples(raw, jnp.arange(x.shape[0], dtype=jnp.int32))
    images, texts = examples.image_valid, examples.text_valid
    num_images = jnp.sum(images, dtype=jnp.float32)
    num_texts = jnp.sum(texts, dtype=jnp.float32)
    _, logits = _logits(x32, y32, scale, bias, spec)
    affinity, positive = _pair_targets(examples, examples, spec)
    valid_pairs = images[:, None] & texts[None, :]
    # The counted images (texts): valid, with target mass over the valid other side.
    rows = images & (_target_mass(affinity, texts) > 0)
    cols = texts & (_target_mass(affinity.T, images) > 0)
    if spec.softmax:
        i2t = jnp.sum(_softmax_row_losses(logits, affinity, rows, texts, num_texts, spec))
        t2i = jnp.sum(
            _softmax_row_losses(logits.T, affinity.T, cols, images, num_images, spec)
        )
    else:
        pairs = _sigmoid_pair_loss(logits, affinity, spec)
        i2t = t2i = jnp.sum(jnp.where(valid_pairs, pairs, 0.0))
    return {
        "i2t": i2t,
        "t2i": t2i,
        "correct_i2t": jnp.sum(_top1_correct(logits, positive, rows, texts), dtype=jnp.float32),
        "correct_t2i": jnp.sum(
            _top1_correct(logits.T, positive.T, cols, images), dtype=jnp.float32
        ),
        "count_i2t": jnp.sum(rows, dtype=jnp.float32),
        "count_t2i": jnp.sum(cols, dtype=jnp.float32),
        "images": num_images,
        "texts": num_texts,
        **_pair_logit_sums(logits, positive, valid_pairs),
    }


# ----------------------------------------------------------------------------------------
# all_gather: local rows against the gathered global columns.


def _all_gather_body(x, y, scale, bias, raw, *, spec, axes):
    local = x.shape[0]
    gather = lambda a: jax.lax.all_gather(a, axes, axis=0, tiled=True)
    ids = jax.lax.axis_index(axes) * local + jnp.arange(local, dtype=jnp.int32)
    rows = _examples(raw, ids)
    cols = _examples({k: gather(v) for k, v in raw.items()}, gather(ids))
    num_images = jax.lax.psum(jnp.sum(rows.image_valid, dtype=jnp.float32), axes)
    num_texts = jax.lax.psum(jnp.sum(rows.text_valid, dtype=jnp.float32), axes)
    # Gathered in float32 so that the backward reduce-scatter of gradients sums in float32.
    x32, y32 = x.astype(jnp.float32), y.astype(jnp.float32)
    _, logits = _logits(x32, gather(y32), scale, bias, spec)
    affinity, positive = _pair_targets(rows, cols, spec)
    valid_pairs = rows.image_valid[:, None] & cols.text_valid[None, :]
    counted_images = rows.image_valid & (_target_mass(affinity, cols.text_valid) > 0)
    sums = _pair_logit_sums(logits, positive, valid_pairs)
    sums["correct_i2t"] = jnp.sum(
        _top1_correct(logits, positive, counted_images, cols.text_valid), dtype=jnp.float32
    )
    sums["count_i2t"] = jnp.sum(counted_images, dtype=jnp.float32)
    if spec.softmax:
        # A is symmetric, so the local text rows against all images use the same targets.
        _, text_logits = _logits(y32, gather(x32), scale, bias, spec)
        counted_texts = rows.text_valid & (_target_mass(affinity, cols.image_valid) > 0)
        sums["i2t"] = jnp.sum(_softmax_row_losses(
            logits, affinity, counted_images, cols.text_valid, num_texts, spec))
        sums["t2i"] = jnp.sum(_softmax_row_losses(
            text_logits, affinity, counted_texts, cols.image_valid, num_images, spec))
        sums["correct_t2i"] = jnp.sum(
            _top1_correct(text_logits, positive, counted_texts, cols.image_valid),
            dtype=jnp.float32,
        )
        sums["count_t2i"] = jnp.sum(counted_texts, dtype=jnp.float32)
    else:
        pairs = _sigmoid_pair_loss(logits, affinity, spec)
        sums["i2t"] = sums["t2i"] = jnp.sum(jnp.where(valid_pairs, pairs, 0.0))
        # Column statistics over all images: combine the local rows' across devices.
        frozen = jax.lax.stop_gradient(logits)
        images = rows.image_valid[:, None]
        best = jax.lax.pmax(jnp.max(jnp.where(images, frozen, -jnp.inf), axis=0), axes)
        best_pos = jax.lax.pmax(
            jnp.max(jnp.where(images & positive, frozen, -jnp.inf), axis=0), axes
        )
        column_mass = jax.lax.psum(_target_mass(affinity.T, rows.image_valid), axes)
    sums = {k: jax.lax.psum(v, axes) for k, v in sums.items()}
    if not spec.softmax:
        # Already global: every device holds all columns' statistics.
        counted_texts = cols.text_valid & (column_mass > 0)
        sums["correct_t2i"] = jnp.sum(counted_texts & (best_pos >= best), dtype=jnp.float32)
        sums["count_t2i"] = jnp.sum(counted_texts, dtype=jnp.float32)
    sums["images"], sums["texts"] = num_images, num_texts
    return sums


# ----------------------------------------------------------------------------------------
# ring: blocks travel around the devices of the batch axes.


_PACKED_WIDTH = 64  # Per-example leaves up to this many values share one transfer.


def _shift(tree, axes, perm):
    """`ppermute` of a pytree of per-example arrays, the small ones packed by dtype.

    The ring sends a handful of [local] statistics and target fields each step; one
    transfer per dtype instead of one per array saves per-message latency.
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


def _ring_pass(step: Callable, payload, travel, local, *, axes, size: int):
    """Visits every device's block once; `travel` rides with its block and ends at home.

    `step(payload, travel, local) -> (travel, local)` scores the visiting block
    `payload` (constant along the way) against this device's rows. The next block is
    sent before the current one is scored, so that transfer can overlap compute.
    """
    if size == 1:
        return step(payload, travel, local)
    perm = [(i, (i + 1) % size) for i in range(size)]
    shift = lambda tree: _shift(tree, axes, perm)
    incoming = shift(payload)
    travel, local = step(payload, travel, local)

    def body(_, carry):
        payload, travel, local = carry
        following = shift(payload)
        travel, local = step(payload, shift(travel), local)
        return following, travel, local

    payload, travel, local = jax.lax.fori_loop(0, size - 2, body, (incoming, travel, local))
    travel, local = step(payload, shift(travel), local)
    return shift(travel), local


def _side_stats(n: int, spec: LossSpec) -> dict[str, jax.Array]:
    """Streaming statistics of n rows (or columns) over the valid partners seen so far."""
    stats = {
        "max": jnp.full((n,), -jnp.inf), "pos_max": jnp.full((n,), -jnp.inf),
        "target_mass": jnp.zeros((n,)),
    }
    if spec.softmax:
        stats.update(
            sumexp=jnp.zeros((n,)), target_logit=jnp.zeros((n,)), logit_sum=jnp.zeros((n,)),
        )
    return stats


def _update_side(stats, logits, affinity, positive, partner_valid, axis, spec):
    """Folds one block into `stats`, reducing over `axis` (1: rows, 0: columns)."""
    masked = jnp.where(partner_valid, logits, -jnp.inf)
    weights = jnp.where(partner_valid, affinity, 0.0)
    new = {
        "max": jnp.maximum(stats["max"], jnp.max(masked, axis=axis)),
        "pos_max": jnp.maximum(
            stats["pos_max"], jnp.max(jnp.where(positive, masked, -jnp.inf), axis=axis)
        ),
        "target_mass": stats["target_mass"] + jnp.sum(weights, axis),
    }
    if spec.softmax:
        ref = jnp.where(jnp.isfinite(new["max"]), new["max"], 0.0)
        exps = jnp.where(partner_valid, jnp.exp(logits - jnp.expand_dims(ref, axis)), 0.0)
        new["sumexp"] = stats["sumexp"] * jnp.exp(stats["max"] - ref) + jnp.sum(exps, axis)
        new["target_logit"] = stats["target_logit"] + jnp.sum(weights * logits, axis)
        new["logit_sum"] = stats["logit_sum"] + jnp.sum(
            jnp.where(partner_valid, logits, 0.0), axis
        )
    return new


def _logsumexp(stats):
    return jnp.where(stats["sumexp"] > 0, stats["max"] + jnp.log(stats["sumexp"]), 0.0)


def _safe_mass(stats):
    return jnp.where(stats["target_mass"] > 0, stats["target_mass"], 1.0)


def _side_loss_sum(stats, counted, partners, spec):
    """Summed cross-entropy of the `counted` rows; `partners`: valid ones of the other side."""
    eps = spec.label_smoothing
    nll = (
        _logsumexp(stats)
        - (1 - eps) * stats["target_logit"] / _safe_mass(stats)
        - eps * stats["logit_sum"] / jnp.maximum(partners, 1.0)
    )
    return jnp.sum(jnp.where(counted, nll, 0.0))


def _ring_local_setup(x, raw, axes):
    local = x.shape[0]
    ids = jax.lax.axis_index(axes) * local + jnp.arange(local, dtype=jnp.int32)
    return _examples(raw, ids), x.astype(jnp.float32)


def _ring_counts(rows, axes):
    """(valid images, valid texts) of the global batch."""
    count = lambda valid: jax.lax.psum(jnp.sum(valid, dtype=jnp.float32), axes)
    return count(rows.image_valid), count(rows.text_valid)


def _ring_forward_body(x, y, scale, bias, raw, *, spec, axes, size):
    rows, x32 = _ring_local_setup(x, raw, axes)
    num_images, num_texts = _ring_counts(rows, axes)

    def step(payload, col_stats, acc):
        y_block, cols = payload
        _, logits = _logits(x32, y_block.astype(jnp.float32), scale, bias, spec)
        affinity, positive = _pair_targets(rows, cols, spec)
        valid_pairs = rows.image_valid[:, None] & cols.text_valid[None, :]
        row_stats = _update_side(
            acc["rows"], logits, affinity, positive, cols.text_valid[None, :], 1, spec
        )
        col_stats = _update_side(
            col_stats, logits, affinity, positive, rows.image_valid[:, None], 0, spec
        )
        block = _pair_logit_sums(logits, positive, valid_pairs)
        if not spec.softmax:
            pairs = _sigmoid_pair_loss(logits, affinity, spec)
            block["pairs"] = jnp.sum(jnp.where(valid_pairs, pairs, 0.0))
        sums = {k: v + block.get(k, 0.0) for k, v in acc["sums"].items()}
        return col_stats, {"rows": row_stats, "sums": sums}

    local = x.shape[0]
    zero = jnp.zeros((), jnp.float32)
    sums0 = {k: zero for k in ("pos_sum", "pos_count", "neg_sum", "neg_count", "pairs")}
    col_stats, acc = _ring_pass(
        step, (y, rows), _side_stats(local, spec), {"rows": _side_stats(local, spec),
                                                   "sums": sums0},
        axes=axes, size=size,
    )
    row_stats, sums = acc["rows"], dict(acc["sums"])
    # This device's images (rows) and, back home after the turn, its texts (columns).
    counted_images = rows.image_valid & (row_stats["target_mass"] > 0)
    counted_texts = rows.text_valid & (col_stats["target_mass"] > 0)
    correct = lambda st, counted: jnp.sum(counted & (st["pos_max"] >= st["max"]),
                                          dtype=jnp.float32)
    sums["correct_i2t"] = correct(row_stats, counted_images)
    sums["correct_t2i"] = correct(col_stats, counted_texts)
    sums["count_i2t"] = jnp.sum(counted_images, dtype=jnp.float32)
    sums["count_t2i"] = jnp.sum(counted_texts, dtype=jnp.float32)
    if spec.softmax:
        sums["i2t"] = _side_loss_sum(row_stats, counted_images, num_texts, spec)
        sums["t2i"] = _side_loss_sum(col_stats, counted_texts, num_images, spec)
        residuals = {
            "row_lse": _logsumexp(row_stats), "row_mass": _safe_mass(row_stats),
            "row_counted": counted_images,
            "col_lse": _logsumexp(col_stats), "col_mass": _safe_mass(col_stats),
            "col_counted": counted_texts,
        }
    else:
        sums["i2t"] = sums["t2i"] = sums["pairs"]
        residuals = {}
    del sums["pairs"]
    sums = {k: jax.lax.psum(v, axes) for k, v in sums.items()}
    sums["images"], sums["texts"] = num_images, num_texts
    return sums, residuals


def _ring_backward_body(x, y, scale, bias, raw, residuals, num_images, num_texts, ct_i2t,
                        ct_t2i, *, spec, axes, size):
    rows, x32 = _ring_local_setup(x, raw, axes)
    eps = spec.label_smoothing
    inv_images = 1.0 / jnp.maximum(num_images, 1.0)
    inv_texts = 1.0 / jnp.maximum(num_texts, 1.0)

    def step(payload, dy, acc):
        y_block, cols, col_res = payload
        y32 = y_block.astype(jnp.float32)
        dots, logits = _logits(x32, y32, scale, bias, spec)
        affinity, _ = _pair_targets(rows, cols, spec)
        valid_pairs = rows.image_valid[:, None] & cols.text_valid[None, :]
        if spec.softmax:
            # exp() arguments are <= 0 for valid pairs; the clamp keeps masked ones finite.
            p_row = jnp.exp(jnp.minimum(logits - residuals["row_lse"][:, None], 0.0))
            p_col = jnp.exp(jnp.minimum(logits - col_res["col_lse"][None, :], 0.0))
            t_row = (1 - eps) * affinity / residuals["row_mass"][:, None] + eps * inv_texts
            t_col = (1 - eps) * affinity / col_res["col_mass"][None, :] + eps * inv_images
            # Rows (columns) left out of their direction's loss get no gradient from it.
            d_row = jnp.where(residuals["row_counted"][:, None], p_row - t_row, 0.0)
            d_col = jnp.where(col_res["col_counted"][None, :], p_col - t_col, 0.0)
            dlogits = ct_i2t * d_row + ct_t2i * d_col
        else:
            dlogits = (ct_i2t + ct_t2i) * _sigmoid_pair_grad(logits, affinity, spec)
        dlogits = jnp.where(valid_pairs, dlogits, 0.0)
        dy = dy + scale * (dlogits.T @ x32)
        acc = {
            "dx": acc["dx"] + scale * (dlogits @ y32),
            "dscale": acc["dscale"] + jnp.sum(dlogits * dots),
            "dbias": acc["dbias"] + jnp.sum(dlogits),
        }
        return dy, acc

    col_res = {k: residuals[k] for k in ("col_lse", "col_mass", "col_counted")
               if k in residuals}
    zero = jnp.zeros((), jnp.float32)
    dy, acc = _ring_pass(
        step, (y, rows, col_res), jnp.zeros(y.shape, jnp.float32),
        {"dx": jnp.zeros(x.shape, jnp.float32), "dscale": zero, "dbias": zero},
        axes=axes, size=size,
    )
    return (
        acc["dx"].astype(x.dtype), dy.astype(y.dtype),
        jax.lax.psum(acc["dscale"], axes), jax.lax.psum(acc["dbias"], axes),
    )


def _ring_sums(x, y, scale, bias, raw, *, spec, mesh, axes):
    size = _axes_size(mesh, axes)
    rows, rep = P(axes), P()
    options = dict(spec=spec, axes=axes, size=size)

    @jax.custom_vjp
    def ring(x, y, scale, bias, raw):
        return forward(x, y, scale, bias, raw)[0]

    def forward(x, y, scale, bias, raw):
        sums, residuals = jax.shard_map(
            lambda *a: _ring_forward_body(*a, **options),
            mesh=mesh, in_specs=(rows, rows, rep, rep, rows), out_specs=(rep, rows),
            check_vma=False,
        )(x, y, scale, bias, raw)
        return sums, (x, y, scale, bias, raw, residuals, sums["images"], sums["texts"])

    def backward(saved, cts):
        x, y, scale, bias, raw, residuals, num_images, num_texts = saved
        dx, dy, dscale, dbias = jax.shard_map(
            lambda *a: _ring_backward_body(*a, **options),
            mesh=mesh, in_specs=(rows, rows, rep, rep, rows, rows, rep, rep, rep, rep),
            out_specs=(rows, rows, rep, rep), check_vma=False,
        )(x, y, scale, bias, raw, residuals, num_images, num_texts, cts["i2t"], cts["t2i"])
        return dx, dy, dscale.astype(scale.dtype), dbias.astype(bias.dtype), None

    ring.defvjp(forward, backward)
    return ring(x, y, scale, bias, raw)


# ----------------------------------------------------------------------------------------
# Entry point.


def _axes_size(mesh: Mesh, axes: tuple[str, ...]) -> int:
    size = 1
    for axis in axes:
        size *= mesh.shape[axis]
    return size


def _place(x: jax.Array, mesh: Mesh, spec: P) -> jax.Array:
    """Gives `x` the sharding shard_map expects when the mesh's axes are Explicit."""
    if AxisType.Explicit in mesh.axis_types:
        return jax.reshard(x, NamedSharding(mesh, spec))
    return x


def _replicate_explicit(x: jax.Array) -> jax.Array:
    """The dense reference works on whole arrays: undo an Explicit-mode batch sharding."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    if sharding is not None and any(p is not None for p in sharding.spec):
        return jax.reshard(x, NamedSharding(sharding.mesh, P()))
    return x


def _scalar(value: Any, what: str) -> jax.Array:
    value = jnp.asarray(value)
    if value.size != 1:
        raise ValueError(f"{what} must be a scalar; got shape {value.shape}")
    return value.reshape(()).astype(jnp.float32)


def _raw_targets(batch: Mapping[str, jax.Array], size: int, spec: LossSpec):
    """Checks the batch fields the targets need and packs them as {image_valid,
    text_valid, keys?, labels?}."""

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
                if labels.shape[1] <= _NO_FINDING:
                    raise ValueError(
                        f"multi_positive_key 'no_finding' reads column {_NO_FINDING} of "
                        f"batch['labels'] ('No Finding'); got shape {labels.shape}")
                # -1 for every normal example; else its position, which matches no other.
                normal = labels[:, _NO_FINDING] == 1
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


def contrastive_loss(
    image_emb: jax.Array,
    text_emb: jax.Array,
    scale: jax.Array,
    bias: jax.Array | None,
    batch: Mapping[str, jax.Array],
    *,
    config: ml_collections.ConfigDict | Mapping[str, Any],
    mesh: Mesh | None,
    batch_axes: Sequence[str] | str,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss named by `config` on L2-normalised [B, D] embeddings -> (loss, metrics).

    `scale` multiplies the cosine similarities (already exponentiated and clamped);
    `bias` is added by the sigmoid loss (unused by softmax, may be None there). `batch`
    holds the per-example validity flags (`mask`, `image_mask`, `text_mask`; each
    optional, all True when absent) and target fields (`study_id`, `text_id`, `labels`)
    as global arrays. With a mesh, the batch dimension is sharded over `batch_axes`.
    """
    spec = LossSpec.from_config(config)
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(
            f"image and text embeddings must both be [batch, dim] with the same shape; got "
            f"{image_emb.shape} and {text_emb.shape}"
        )
    size = image_emb.shape[0]
    scale = _scalar(scale, "scale")
    if spec.softmax:
        bias = jnp.zeros((), jnp.float32)  # Softmax is shift invariant: no bias gradient.
    elif bias is None:
        raise ValueError("the sigmoid loss needs a bias; got bias=None")
    else:
        bias = _scalar(bias, "bias")
    raw = _raw_targets(batch, size, spec)

    if spec.impl == "dense" or mesh is None:
        args = jax.tree.map(_replicate_explicit, (image_emb, text_emb, scale, bias, raw))
        return _finish(_dense_sums(*args, spec), spec)

    axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    unknown = [a for a in axes if a not in mesh.axis_names]
    if not axes or unknown or len(set(axes)) != len(axes):
        raise ValueError(
            f"batch_axes={axes} must be distinct axes of the mesh, whose axes are "
            f"{mesh.axis_names}"
        )
    shards = _axes_size(mesh, axes)
    if size % shards:
        raise ValueError(
            f"global batch {size} is not divisible by the {shards} devices of the batch "
            f"axes {axes}; pad the batch to a multiple of {shards} and mark the padding "
            f"with batch['mask']"
        )
    rows, rep = P(axes), P()
    image_emb, text_emb = _place(image_emb, mesh, rows), _place(text_emb, mesh, rows)
    scale, bias = _place(scale, mesh, rep), _place(bias, mesh, rep)
    raw = {k: _place(v, mesh, rows) for k, v in raw.items()}
    if spec.impl == "all_gather":
        sums = jax.shard_map(
            lambda *a: _all_gather_body(*a, spec=spec, axes=axes),
            mesh=mesh, in_specs=(rows, rows, rep, rep, rows), out_specs=rep, check_vma=False,
        )(image_emb, text_emb, scale, bias, raw)
    else:
        sums = _ring_sums(image_emb, text_emb, scale, bias, raw, spec=spec, mesh=mesh, axes=axes)
    return _finish(sums, spec)
