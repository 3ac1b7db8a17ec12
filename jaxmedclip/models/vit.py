"""Vision Transformer image tower for (grayscale) medical images."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmedclip import config_schema
from jaxmedclip.models.layers import Attention, Dtype, Encoder, Mlp, embed_init, layer_norm, logical

POOLS = config_schema.IMAGE_POOLS


class AttentionPool(nn.Module):
    """Multi-head attention pooling (a learned probe attends over the tokens), then an MLP."""

    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        probe = self.param(
            "probe", logical(embed_init, (None, None, "embed")), (1, 1, width), self.param_dtype
        )
        probe = jnp.broadcast_to(probe.astype(self.dtype), (x.shape[0], 1, width))
        x = Attention(self.num_heads, self.dtype, self.param_dtype, name="attn")(probe, x)
        y = layer_norm(self.dtype, self.param_dtype, "norm")(x)
        x = x + Mlp(self.mlp_dim, self.dtype, self.param_dtype, name="mlp")(y)
        return x[:, 0]


class ViT(nn.Module):
    """Patchify -> (class token) -> learned positions -> transformer -> pooled vector.

    `pre_norm` adds a LayerNorm between the embeddings and the first block (CLIP's
    `pre_layrnorm`; needed to export as a Hugging Face CLIP vision tower).
    Returns `(pooled [batch, width], patch_tokens [batch, num_patches, width])`.
    """

    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    pool: str = "cls"
    num_channels: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    scan_layers: bool = False
    pre_norm: bool = False
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        if images.ndim != 4 or images.shape[-1] != self.num_channels:
            raise ValueError(
                f"images must be [batch, height, width, {self.num_channels}]; got {images.shape}"
            )
        p = self.patch_size
        x = nn.Conv(
            self.width,
            kernel_size=(p, p),
            strides=(p, p),
            padding="VALID",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=logical(
                nn.initializers.lecun_normal(), ("conv_height", "conv_width", "channels", "embed")
            ),
            bias_init=logical(nn.initializers.zeros, ("embed",)),
            name="patch_embed",
        )(images.astype(self.dtype))
        batch, gh, gw, _ = x.shape
        x = x.reshape(batch, gh * gw, self.width)
        if self.pool == "cls":
            cls = self.param(
                "cls",
                logical(nn.initializers.zeros, (None, None, "embed")),
                (1, 1, self.width),
                self.param_dtype,
            )
            x = jnp.concatenate(
                [jnp.broadcast_to(cls.astype(self.dtype), (batch, 1, self.width)), x], 1
            )
        pos = self.param(
            "pos_embed",
            logical(embed_init, (None, "seq", "embed")),
            (1, x.shape[1], self.width),
            self.param_dtype,
        )
        x = x + pos.astype(self.dtype)
        if self.pre_norm:
            x = layer_norm(self.dtype, self.param_dtype, "pre_norm")(x)
        x = Encoder(
            self.depth,
            self.num_heads,
            int(self.width * self.mlp_ratio),
            self.dtype,
            self.param_dtype,
            self.remat,
            self.scan_layers,
            attention_impl=self.attention_impl,
            name="encoder",
        )(x)
        if self.pool == "cls":
            return x[:, 0], x[:, 1:]
        if self.pool == "mean":
            return x.mean(axis=1), x
        if self.pool == "map":
            head = AttentionPool(
                self.num_heads,
                int(self.width * self.mlp_ratio),
                self.dtype,
                self.param_dtype,
                name="map_head",
            )
            return head(x), x
        raise ValueError(f"model.image.pool={self.pool!r} is unknown; choose one of {POOLS}")
