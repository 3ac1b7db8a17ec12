"""CXR-CLIP-style multi-view terms: two images and two texts per study.

Each study brings two image embeddings (x1, x2: two views, or two augmentations of its
only view) and two text embeddings (t1, t2: e.g. FINDINGS and IMPRESSION, two sampled
sentences, or a report and its labels written as text). With C(a, b) the global
contrastive loss of `jaxmedclip.losses.contrastive_loss` between embedding sets a and b
(same config: softmax or sigmoid, targets, implementation, sharding):

  image_text  = reduce over the 2x2 pairs of C(x_a, t_b), a, b in {1, 2}
                (reduce = mean, or sum with `image_text_reduction="sum"`)
  image_image = C(x1, x2)   (the image-image contrastive term, ICL)
  text_text   = C(t1, t2)   (the text-text contrastive term, TCL)
  loss = image_text_weight * image_text + image_image_weight * image_image
         + text_text_weight * text_text

Every term takes its negatives from the whole global batch exactly as the global loss
does (`loss.impl`: dense / all_gather / ring), because each one is a
`contrastive_loss` call. All terms share `scale` (and `bias` for sigmoid).

Targets read the batch's per-example fields (`mask`, `study_id`, `text_id`, `labels`).
When the batch holds `text_id2` (the hash of the second text, from the input pipeline's
`data.multiview`), the terms with text 2, C(x_a, t2), read it as their `text_id`, so
that `multi_positive` targets match second texts with second texts; image_image and
text_text read the batch as it is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from jaxmedclip import config_schema, losses

_DEFAULT = config_schema.defaults("loss.multiview")  # The defaults are declared there.


@dataclasses.dataclass(frozen=True)
class MultiviewSpec:
    """The validated contents of `config.loss.multiview` (see the module docstring)."""

    image_text_weight: float = _DEFAULT["image_text_weight"]
    image_image_weight: float = _DEFAULT["image_image_weight"]
    text_text_weight: float = _DEFAULT["text_text_weight"]
    image_text_reduction: str = _DEFAULT["image_text_reduction"]

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict | Mapping[str, Any] | None
                    ) -> MultiviewSpec:
        """`loss.multiview` (None: the defaults), checked (`config_schema.MULTIVIEW`)."""
        spec = cls(**config_schema.complete_section("loss.multiview", config))
        for name in ("image_text_weight", "image_image_weight", "text_text_weight"):
            if getattr(spec, name) < 0:
                raise ValueError(f"loss.multiview.{name}={getattr(spec, name)} must be >= 0")
        return spec


def multiview_loss(
    image_embs: Sequence[jax.Array],
    text_embs: Sequence[jax.Array],
    scale: jax.Array,
    bias: jax.Array | None,
    batch: Mapping[str, jax.Array],
    *,
    config: ml_collections.ConfigDict | Mapping[str, Any],
    mesh: Mesh | None,
    batch_axes: Sequence[str] | str,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """CXR-CLIP terms (module doc) on L2-normalised [B, D] embeddings -> (loss, metrics).

    `image_embs` = (view 1, view 2), `text_embs` = (text 1, text 2). `config` is the whole
    `config.loss`: each pairwise term is `contrastive_loss(..., config=config)`, and the
    weights come from `config.loss.multiview` (`MultiviewSpec`). Metrics: the three
    terms (`loss_image_text`, `loss_image_image`, `loss_text_text`) and every pairwise
    term's own metrics under `image{a}_text{b}/`, `image_image/` and `text_text/`.
    """
    if len(image_embs) != 2 or len(text_embs) != 2:
        raise ValueError(f"need two image and two text embeddings per study; got "
                         f"{len(image_embs)} and {len(text_embs)}")
    spec = MultiviewSpec.from_config(config.get("multiview"))

    second_text_batch = batch
    if "text_id2" in batch:
        second_text_batch = {**batch, "text_id": batch["text_id2"]}

    def term(a, b, term_batch=batch):
        return losses.contrastive_loss(a, b, scale, bias, term_batch, config=config, mesh=mesh,
                                       batch_axes=batch_axes)

    metrics: dict[str, jax.Array] = {}

    def record(prefix, result):
        loss, term_metrics = result
        metrics.update({f"{prefix}/{k}": v for k, v in term_metrics.items()})
        return loss

    pairs = [record(f"image{a + 1}_text{b + 1}",
                    term(image_embs[a], text_embs[b], (batch, second_text_batch)[b]))
             for a in range(2) for b in range(2)]
    image_text = sum(pairs)
    if spec.image_text_reduction == "mean":
        image_text = image_text / len(pairs)
    total = spec.image_text_weight * image_text
    metrics["loss_image_text"] = image_text
    if spec.image_image_weight:
        image_image = record("image_image", term(image_embs[0], image_embs[1]))
        metrics["loss_image_image"] = image_image
        total = total + spec.image_image_weight * image_image
    if spec.text_text_weight:
        text_text = record("text_text", term(text_embs[0], text_embs[1]))
        metrics["loss_text_text"] = text_text
        total = total + spec.text_text_weight * text_text
    return total, metrics
