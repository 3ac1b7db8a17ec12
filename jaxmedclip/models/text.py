"""Transformer text tower: causal (CLIP-style) or bidirectional (BERT-style)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmedclip import config_schema
from jaxmedclip.models.layers import Dtype, Encoder, dense_init, embed_init, layer_norm, logical

VARIANTS = config_schema.TEXT_VARIANTS
# Where the pooled vector is read; None: the variant's default (causal: eos, else first).
POOLS = tuple(p for p in config_schema.TEXT_POOLS if p is not None)
LAYOUTS = config_schema.TEXT_LAYOUTS


class TextTransformer(nn.Module):
    """Token + position embeddings -> transformer -> pooled vector.

    `causal`: each token attends to earlier tokens; pooled at the (first) end-of-text token.
    `bidirectional`: tokens attend to all non-pad tokens; pooled at the first token (BOS).
    `pool` overrides where the vector is read: `eos` (first end-of-text token), `first`, or
    `last` (the last position, a pad token in padded rows; SigLIP's text pooling).
    `layout="bert"` is BERT's: LayerNorm after the embeddings, post-LayerNorm blocks, and
    the pooled vector through dense + tanh (BERT's pooler); default `pre_ln`.
    Returns `(pooled [batch, width], token_features [batch, length, width])`.
    """

    vocab_size: int
    max_len: int
    width: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    variant: str = "causal"
    pad_id: int = 0
    eos_id: int = 3
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    scan_layers: bool = False
    pool: str | None = None
    layout: str = "pre_ln"
    attention_impl: str | None = None
    attention_pad_multiple: int | None = None
    remat_policy: str = "full"
    scan_unroll: int = 1

    @nn.compact
    def __call__(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        if self.variant not in VARIANTS:
            raise ValueError(
                f"model.text.variant={self.variant!r} is unknown; choose one of {VARIANTS}"
            )
        if tokens.ndim != 2 or tokens.shape[1] > self.max_len:
            raise ValueError(f"tokens must be [batch, <= {self.max_len}]; got {tokens.shape}")
        length = tokens.shape[1]
        embed = nn.Embed(
            self.vocab_size,
            self.width,
            embedding_init=logical(embed_init, ("vocab", "embed")),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="token_embed",
        )
        pos = self.param(
            "pos_embed",
            logical(embed_init, ("seq", "embed")),
            (self.max_len, self.width),
            self.param_dtype,
        )
        x = embed(tokens) + pos[None, :length].astype(self.dtype)
        bert = self.layout == "bert"
        if bert:
            x = layer_norm(self.dtype, self.param_dtype, "embed_norm")(x)
        # Rows are right-padded (input_pipeline.tokenizer), so the non-pad count is where
        # each row's padding starts: keys from there on are ignored.
        lengths = jnp.sum(tokens != self.pad_id, axis=1, dtype=jnp.int32)
        x = Encoder(
            self.depth,
            self.num_heads,
            int(self.width * self.mlp_ratio),
            self.dtype,
            self.param_dtype,
            self.remat,
            self.scan_layers,
            post_norm=bert,
            causal=self.variant == "causal",
            attention_impl=self.attention_impl,
            attention_pad_multiple=self.attention_pad_multiple,
            remat_policy=self.remat_policy,
            scan_unroll=self.scan_unroll,
            name="encoder",
        )(x, lengths)
        pool = self.pool or ("eos" if self.variant == "causal" else "first")
        if pool == "eos":
            index = jnp.argmax(tokens == self.eos_id, axis=1)
            pooled = jnp.take_along_axis(x, index[:, None, None], axis=1)[:, 0]
        elif pool == "first":
            pooled = x[:, 0]
        elif pool == "last":
            pooled = x[:, -1]
        else:
            raise ValueError(f"model.text.pool={self.pool!r} is unknown; choose one of {POOLS}")
        if bert:
            pooled = nn.Dense(
                self.width,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=logical(dense_init, ("embed", "mlp")),
                bias_init=logical(nn.initializers.zeros, ("mlp",)),
                name="pooler",
            )(pooled)
            pooled = jnp.tanh(pooled)
        return pooled, x
