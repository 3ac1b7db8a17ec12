"""The training objective: the towers' outputs -> (loss, metrics) over the global batch.

The objective is the global contrastive loss of `config.loss` (`jaxmedclip.losses`),
plus, when `config.loss.local` is set with a weight > 0, the GLoRIA-style local
alignment loss (`jaxmedclip.methods.local_alignment`):

    loss = global + loss.local.weight * local

`loss.local` fields: weight (default 1.0; 0 turns the term off), max_words (words per
text kept by sub-word pooling; default None: the text length), t1, t2, t3, impl
(default: `loss.impl`), i2t_weight, t2i_weight. The term needs the model's local
projections (`model.local_dim`) and, when it aligns words (`model.local_text="words"`),
the tokenizer's word-start table (`word_starts`); with `model.local_text="sentence"` each
text's pooled feature is its one "word".

When `config.loss.multiview` is set (CXR-CLIP), the towers also embed the batch's second
images and texts (`image2`, `tokens2`, from the input pipeline's `data.multiview`) and
the global loss is replaced by the multi-view combination of
`jaxmedclip.methods.multiview` (image-text over the 2x2 pairs, image-image, text-text).
With `loss.local` too, the local term reads the first view and the first text (the plain
CLIP pair).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from jaxmedclip import config_schema, losses, parallel
from jaxmedclip.methods import local_alignment, multiview

# The model outputs the loss reads per example (the rest, scale and bias, are scalars).
EMBEDDINGS = ("image_emb", "text_emb")
# The batch fields of the second view and text that `loss.multiview` reads.
MULTIVIEW_INPUTS = ("image2", "tokens2")
LOCAL_FEATURES = ("image_local", "text_local")
SECOND_EMBEDDINGS = ("image_emb2", "text_emb2")  # Of `MULTIVIEW_INPUTS`.


@dataclasses.dataclass(frozen=True)
class LocalTerm:
    """The local alignment term of the objective, read from `config.loss.local`."""

    weight: float
    max_words: int | None
    loss_kwargs: dict[str, Any]  # For `local_alignment.local_alignment_loss`.
    word_starts: np.ndarray | None  # bool [vocab]: does token id i start a word?
    sentence: bool = False  # model.local_text == "sentence": one feature per text.

    @classmethod
    def from_config(
        cls, loss_config: ml_collections.ConfigDict, word_starts: Any, model: nn.Module
    ) -> LocalTerm | None:
        """The term, or None when `loss.local` is absent or its weight is 0."""
        loss = config_schema.complete_section("loss", loss_config)
        local = loss["local"]
        if local is None:
            return None
        weight = local["weight"]
        if weight < 0:
            raise ValueError(f"loss.local.weight={weight} must be >= 0 (0: no local loss)")
        kwargs = local_alignment.local_alignment_config(local, default_impl=loss["impl"])
        if weight == 0:
            return None
        max_words = local["max_words"]
        if max_words is not None and (isinstance(max_words, bool) or int(max_words) <= 0):
            raise ValueError(f"loss.local.max_words={max_words!r} must be a positive integer "
                             "or None (all tokens)")
        if getattr(model, "local_dim", None) is None:
            raise ValueError(
                "loss.local (the local alignment loss) needs the model's local projections of "
                "patch tokens and token features: set model.local_dim (e.g. 128)"
            )
        if getattr(model, "local_text", "words") == "sentence":
            return cls(weight, None, kwargs, None, sentence=True)
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
        words, word_mask = local_alignment.text_words(
            text_local, batch["tokens"], self.word_starts, sentence=self.sentence,
            max_words=self.max_words,
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


def check_multiview(loss_config, microbatch_size) -> bool:
    """Whether the multi-view objective is on, once its settings are known to fit."""
    if not multiview_enabled(loss_config):
        return False
    multiview.MultiviewSpec.from_config(loss_config.multiview)
    return True


@dataclasses.dataclass(frozen=True)
class Objective:
    """The configured objective for one model and mesh, its settings checked once."""

    model: nn.Module
    loss_config: ml_collections.ConfigDict
    spec: losses.LossSpec
    mesh: Mesh
    local: LocalTerm | None
    with_views: bool

    @classmethod
    def from_config(cls, model: nn.Module, loss_config: ml_collections.ConfigDict, mesh: Mesh,
                    *, word_starts: Any = None, microbatch_size: Any = None) -> Objective:
        local = LocalTerm.from_config(loss_config, word_starts, model)
        with_views = check_multiview(loss_config, microbatch_size)
        return cls(model, loss_config, losses.LossSpec.from_config(loss_config), mesh, local,
                   with_views)

    @property
    def features(self) -> tuple[str, ...]:
        """The per-example model outputs the loss reads (what GradCache caches)."""
        return (EMBEDDINGS + (LOCAL_FEATURES if self.local is not None else ())
                + (SECOND_EMBEDDINGS if self.with_views else ()))

    @property
    def inputs(self) -> tuple[str, ...]:
        """The batch fields the towers read (what GradCache splits into micro-batches)."""
        return ("image", "tokens") + (MULTIVIEW_INPUTS if self.with_views else ())

    def global_loss(self, out, batch):
        """The global contrastive loss, or the multi-view terms (module doc)."""
        if not self.with_views:
            return losses.contrastive_loss(
                out["image_emb"], out["text_emb"], out["scale"], out["bias"], batch,
                config=self.spec, mesh=self.mesh, batch_axes=parallel.BATCH_AXES,
            )
        loss, metrics = multiview.multiview_loss(
            (out["image_emb"], out["image_emb2"]), (out["text_emb"], out["text_emb2"]),
            out["scale"], out["bias"], batch, config=self.loss_config, mesh=self.mesh,
            batch_axes=parallel.BATCH_AXES,
        )
        # The (view 1, text 1) pair is the plain CLIP pair: its accuracies stay comparable.
        metrics.update(acc_i2t=metrics["image1_text1/acc_i2t"],
                       acc_t2i=metrics["image1_text1/acc_t2i"])
        return loss, metrics

    def __call__(self, out, batch):
        """The loss of the module doc from the model's outputs (full global batch)."""
        loss, metrics = self.global_loss(out, batch)
        metrics.update(scale=out["scale"], bias=out["bias"])
        if self.local is None:
            return loss, metrics
        local_loss, local_metrics = self.local.loss(out["image_local"], out["text_local"],
                                                    batch, self.mesh)
        metrics["loss/global"] = loss
        metrics["loss/local"] = local_loss
        metrics.update({f"local/{k}": v for k, v in local_metrics.items()})
        return loss + self.local.weight * local_loss, metrics

    def loss_fn(self, params, batch):
        """(loss, metrics) of the towers applied to the whole batch."""
        out = self.model.apply({"params": params}, batch["image"], batch["tokens"])
        if self.with_views:
            missing = [k for k in MULTIVIEW_INPUTS if k not in batch]
            if missing:
                raise ValueError(
                    f"loss.multiview needs the batch fields {missing} (a second view and "
                    "text per example): set data.multiview=True"
                )
            second = self.model.apply({"params": params}, batch["image2"], batch["tokens2"])
            out = {**out, "image_emb2": second["image_emb"], "text_emb2": second["text_emb"]}
        return self(out, batch)

    def embed_batch(self, params, inputs):
        """The per-example features (`features`) of a (micro-)batch's `inputs` fields."""
        out = self.model.apply({"params": params}, inputs["image"], inputs["tokens"])
        features = {name: out[name] for name in self.features if name in out}
        if self.with_views:
            second = self.model.apply({"params": params}, inputs["image2"], inputs["tokens2"])
            features.update(image_emb2=second["image_emb"], text_emb2=second["text_emb"])
        return features

    def head_loss(self, params, features, batch):
        """The loss from cached per-example features; scale and bias from `params`."""
        scale, bias = self.model.apply({"params": params}, method="temperature")
        return self({**features, "scale": scale, "bias": bias}, batch)
