"""Contrastive image-report losses whose negatives come from the whole global batch.

Embeddings arrive as global `jax.Array`s sharded over the mesh's batch axes. Three
implementations compute the same numbers (`loss.impl`):

- `dense` (dense.py): plain jnp on the global [B, B] logit matrix; the reference the
  tests use.
- `all_gather` (all_gather.py): under `shard_map`, each device gathers the other side's
  embeddings (and the small per-example target information) and scores its local rows
  against the global batch. Memory per device grows with the global batch ([local, B]
  logits).
- `ring` (ring.py): the text block and its target information travel around the ring of
  devices (`ppermute`); softmax rows use a streaming log-sum-exp, column statistics
  travel with their block; the backward pass is a second ring (`custom_vjp`) that
  recomputes logits. Per-device memory does not grow with the number of devices.
  With `loss.tile_size` (tiles.py) each visiting [local, local] block is itself scored
  in [tile, tile] tiles, forward and backward, so no [local, local] array exists and
  loss memory is O(local batch x dim). Without a mesh the tiled ring runs on one device.

Modules: spec.py (the `loss` config), targets.py (batch fields, pair targets, logits,
sums -> loss and metrics), collectives.py (placement, ring passes; shared with the
GLoRIA local loss), dense.py, all_gather.py, ring.py, tiles.py, contrastive.py (the
entry point).

Config (`config.loss`, read with defaults so older configs keep working):
  name: "softmax" (symmetric InfoNCE) | "sigmoid" (SigLIP). Default "softmax".
  impl: "dense" | "all_gather" | "ring". Default "all_gather". Without a mesh: dense
    (or the tiled ring on one device when tile_size > 0).
  tile_size: rows (and columns) per tile of the ring's in-device tiles; 0 (default) or
    None: untiled, one [local, local] block per ring step. Needs impl "ring". A tile
    larger than the per-device batch is the whole batch; a per-device batch that is not
    a multiple of the tile is padded inside the loss with examples valid on neither side.
  matmul_inputs: "float32" (default: exact float32 products) | "bfloat16" (the logit and
    gradient matmuls take bfloat16 inputs and accumulate in float32). Logits and every
    statistic are float32 either way.
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

from jaxmedclip.losses.contrastive import contrastive_loss
from jaxmedclip.losses.spec import (
    IMPLEMENTATIONS,
    LOSSES,
    MATMUL_INPUTS,
    MULTI_POSITIVE_KEYS,
    TARGETS,
    LossSpec,
)
from jaxmedclip.vocabulary import CHEXPERT_FINDINGS

__all__ = [
    "CHEXPERT_FINDINGS",
    "IMPLEMENTATIONS",
    "LOSSES",
    "MATMUL_INPUTS",
    "MULTI_POSITIVE_KEYS",
    "TARGETS",
    "LossSpec",
    "contrastive_loss",
]
