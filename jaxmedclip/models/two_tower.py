"""The CLIP two-tower model: image tower + text tower, projections, temperature, bias."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmedclip import config_schema
from jaxmedclip.models.layers import Dtype, dense_init, logical


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


# The parameters of the local alignment (`local_dim`): trained for grounding maps, not part
# of the two towers that exports and `--hf` folders hold.
LOCAL_PARAMS = ("local_head", "image_local_proj", "text_local_proj")


class TwoTower(nn.Module):
    """Embeds images and texts into one space of `embed_dim`, L2-normalised.

    The temperature is learned as `log_scale` (initialised at log(temperature_init)); the
    scale used by the loss is `exp(log_scale)` clamped at `max_scale`. `bias` (initialised
    at `bias_init`) is used by the sigmoid loss. Without `image_projection` the image
    tower's pooled vector is the embedding (SigLIP's layout; its width must be `embed_dim`).

    With `local_dim` (default None: no such parameters) two more projections map the image
    tower's patch tokens and the text tower's token features into one space of `local_dim`
    for the GLoRIA-style local alignment loss (`jaxmedclip.methods.local_alignment`); the
    model's output then also holds `image_local` [B, P, local_dim] and `text_local`
    [B, T, local_dim], not normalised (the loss takes cosines). The image side reads the
    tower's patch tokens, or, given `local_head` (`vit.LocalPatchHead`), that head's
    features of the images (`local_regions`). With `local_text="sentence"` the text side is
    the projected pooled feature, `text_local` [B, 1, local_dim] (`local_texts`). With
    `local_stop_gradient` the local features read the towers' outputs through
    `stop_gradient`: a local loss then trains the local head and projections only, and the
    towers learn from the global terms alone.
    """

    image_tower: nn.Module
    text_tower: nn.Module
    embed_dim: int
    temperature_init: float = 1 / 0.07
    max_scale: float = 100.0
    bias_init: float = -10.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    image_projection: bool = True
    local_dim: int | None = None
    local_head: nn.Module | None = None
    local_text: str = "words"
    local_stop_gradient: bool = False

    def setup(self):
        self.image_proj = None
        if self.image_projection:
            self.image_proj = nn.Dense(
                self.embed_dim,
                use_bias=False,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=logical(dense_init, ("embed", "proj")),
            )
        self.text_proj = nn.Dense(
            self.embed_dim,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=logical(dense_init, ("embed", "proj")),
        )
        self.image_local_proj = self.text_local_proj = None
        if self.local_text not in config_schema.LOCAL_TEXTS:
            raise ValueError(f"local_text={self.local_text!r} is unknown; choose one of "
                             f"{config_schema.LOCAL_TEXTS}")
        if self.local_dim is not None:
            if self.local_dim <= 0:
                raise ValueError(f"local_dim={self.local_dim} must be positive (None: off)")
            local = lambda: nn.Dense(
                self.local_dim,
                use_bias=False,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=logical(dense_init, ("embed", "proj")),
            )
            self.image_local_proj, self.text_local_proj = local(), local()
        self.log_scale = self.param(
            "log_scale",
            logical(nn.initializers.constant(math.log(self.temperature_init)), ()),
            (),
            jnp.float32,
        )
        self.bias = self.param(
            "bias", logical(nn.initializers.constant(self.bias_init), ()), (), jnp.float32
        )

    def encode_image(self, images: jax.Array, *, return_tokens: bool = False) -> Any:
        pooled, tokens = self.image_tower(images)
        emb = pooled if self.image_proj is None else self.image_proj(pooled)
        emb = l2_normalize(emb)
        return (emb, tokens) if return_tokens else emb

    def encode_text(self, tokens: jax.Array, *, return_tokens: bool = False) -> Any:
        pooled, features = self.text_tower(tokens)
        emb = l2_normalize(self.text_proj(pooled))
        return (emb, features) if return_tokens else emb

    def local_regions(self, images: jax.Array, patches: jax.Array | None = None) -> jax.Array:
        """[B, P, local_dim] region features of the local alignment (not normalised);
        `patches`, the tower's patch tokens, when already computed."""
        if self.local_head is not None:
            return self.image_local_proj(self.local_head(images))
        if patches is None:
            _, patches = self.image_tower(images)
        return self.image_local_proj(self._tower_output(patches))

    def local_texts(self, tokens: jax.Array) -> jax.Array:
        """[B, T, local_dim] token features (`local_text="words"`) or [B, 1, local_dim]
        the pooled feature (`"sentence"`) of the local alignment, not normalised."""
        pooled, features = self.text_tower(tokens)
        return self._local_text_features(pooled, features)

    def _local_text_features(self, pooled, features):
        if self.local_text == "sentence":
            return self.text_local_proj(self._tower_output(pooled))[:, None, :]
        return self.text_local_proj(self._tower_output(features))

    def _tower_output(self, x):
        return jax.lax.stop_gradient(x) if self.local_stop_gradient else x

    def temperature(self) -> tuple[jax.Array, jax.Array]:
        """(scale, bias) as used by the losses: scale = min(exp(log_scale), max_scale)."""
        scale = jnp.exp(jnp.minimum(self.log_scale, math.log(self.max_scale)))
        return scale, self.bias

    def __call__(self, images: jax.Array, tokens: jax.Array) -> dict[str, jax.Array]:
        scale, bias = self.temperature()
        if self.local_dim is None:
            return {
                "image_emb": self.encode_image(images),
                "text_emb": self.encode_text(tokens),
                "scale": scale,
                "bias": bias,
            }
        image_emb, patches = self.encode_image(images, return_tokens=True)
        pooled, features = self.text_tower(tokens)
        text_emb = l2_normalize(self.text_proj(pooled))
        return {
            "image_emb": image_emb,
            "text_emb": text_emb,
            "image_local": self.local_regions(images, patches),
            "text_local": self._local_text_features(pooled, features),
            "scale": scale,
            "bias": bias,
        }
