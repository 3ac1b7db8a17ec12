"""Vision Transformer image tower for (grayscale) medical images."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmedclip import config_schema
from jaxmedclip.models.layers import (
    Attention,
    Dtype,
    Encoder,
    Mlp,
    dense_init,
    embed_init,
    layer_norm,
    logical,
)

POOLS = config_schema.IMAGE_POOLS
PATCH_EMBEDS = config_schema.PATCH_EMBEDS


def normalize_pixels(images: jax.Array, mean: float, std: float, dtype: Dtype) -> jax.Array:
    """Images as they cross to the device -> the model's input scale.

    Integer images (uint8 / uint16: [0, 1] intensities scaled to the type's range, see
    `data.image_dtype`) are normalised here, (x - mean) / std; float images arrive
    normalised by the input pipeline and pass unchanged.
    """
    if not jnp.issubdtype(images.dtype, jnp.integer):
        return images.astype(dtype)
    scale = 1.0 / (jnp.iinfo(images.dtype).max * std)
    return (images.astype(jnp.float32) * scale - mean / std).astype(dtype)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> [batch, h / p, w / p, width].

    "conv": a strided convolution. "dense": the same function as a reshape and one matmul
    over the p * p * channels values of each patch (one-channel convolutions map poorly
    onto GPU kernels). Both hold the convolution's parameters (kernel [p, p, c, width]),
    so checkpoints and exports do not depend on the choice.
    """

    patch_size: int
    width: int
    implementation: str = "dense"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        p, channels = self.patch_size, images.shape[-1]
        kernel = self.param(
            "kernel",
            logical(nn.initializers.lecun_normal(),
                    ("conv_height", "conv_width", "channels", "embed")),
            (p, p, channels, self.width),
            self.param_dtype,
        )
        bias = self.param("bias", logical(nn.initializers.zeros, ("embed",)), (self.width,),
                          self.param_dtype)
        kernel, bias = kernel.astype(self.dtype), bias.astype(self.dtype)
        if self.implementation == "conv":
            x = jax.lax.conv_general_dilated(
                images, kernel, (p, p), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
            return x + bias
        if self.implementation != "dense":
            raise ValueError(f"model.image.patch_embed={self.implementation!r} is unknown; "
                             f"choose one of {PATCH_EMBEDS}")
        batch, height, width, _ = images.shape
        gh, gw = height // p, width // p
        patches = images.reshape(batch, gh, p, gw, p, channels).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(batch, gh, gw, p * p * channels)
        return patches @ kernel.reshape(p * p * channels, self.width) + bias


class LocalPatchHead(nn.Module):
    """Region features with a bounded receptive field: [batch, height, width, c] images ->
    [batch, len(kernels) * G, width], G = (height / stride) * (width / stride) windows of
    p x p pixels every `stride` pixels (row-major; stride = p: the ViT's patches), one
    feature per window and branch (branch-major).

    A window embedding of its own (a p x p convolution of that stride, "SAME" padding, so
    that window i is centred on the centre of the i-th stride x stride cell, as bilinear
    upsampling of the grid assumes; or, with `stem="conv"`, a small CNN: `_conv_stem`)
    and learned positions, shared by the branches; branch
    b is `depth` pre-norm residual blocks x + Dense(gelu(Conv_k(LayerNorm(x)))) over the
    window grid with k = kernels[b], then a LayerNorm. A feature of branch b sees
    1 + depth * (k - 1) windows a side and nothing else, unlike a transformer's patch
    tokens, which attend to the whole image (and, trained only through a pooled vector,
    say little about where a finding lies; GLoRIA reads its regions off an intermediate
    CNN stage for the same reason). Several kernels give each window features at several
    scales: a small finding is best told by its window alone, one whose texture only
    differs from its surroundings with some context.
    """

    patch_size: int
    width: int
    depth: int = 1
    kernels: tuple[int, ...] = (1,)
    stride: int | None = None  # None: patch_size.
    stem: str = "window"  # config_schema.LOCAL_HEAD_STEMS.
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    image_mean: float = 0.0
    image_std: float = 1.0

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        images = normalize_pixels(images, self.image_mean, self.image_std, self.dtype)
        stride = self.stride or self.patch_size
        if self.stem == "conv":
            x = self._conv_stem(images, stride)
        elif stride == self.patch_size:
            x = PatchEmbed(self.patch_size, self.width, "dense", self.dtype, self.param_dtype,
                           name="patch_embed")(images)
        else:
            x = nn.Conv(self.width, (self.patch_size, self.patch_size), (stride, stride),
                        padding="SAME", dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=logical(nn.initializers.lecun_normal(),
                                            ("conv_height", "conv_width", "channels",
                                             "embed")),
                        bias_init=logical(nn.initializers.zeros, ("embed",)),
                        name="patch_embed")(images)
        batch, gh, gw, _ = x.shape
        pos = self.param("pos_embed", logical(embed_init, (None, None, None, "embed")),
                         (1, gh, gw, self.width), self.param_dtype)
        x = x + pos.astype(self.dtype)
        branches = []
        for b, kernel in enumerate(self.kernels):
            y = x
            for i in range(self.depth):
                h = layer_norm(self.dtype, self.param_dtype, f"norm_{b}_{i}")(y)
                h = nn.Conv(self.width, (kernel, kernel), padding="SAME",
                            dtype=self.dtype, param_dtype=self.param_dtype,
                            kernel_init=logical(dense_init, ("conv_height", "conv_width",
                                                             "channels", "mlp")),
                            bias_init=logical(nn.initializers.zeros, ("mlp",)),
                            name=f"conv_{b}_{i}")(h)
                y = y + nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                                 kernel_init=logical(dense_init, ("mlp", "embed")),
                                 bias_init=logical(nn.initializers.zeros, ("embed",)),
                                 name=f"out_{b}_{i}")(nn.gelu(h))
            y = layer_norm(self.dtype, self.param_dtype, f"norm_{b}")(y)
            branches.append(y.reshape(batch, gh * gw, self.width))
        return jnp.concatenate(branches, axis=1)

    def _conv_stem(self, images: jax.Array, stride: int) -> jax.Array:
        """`stem="conv"`: a 3 x 3 convolution at full resolution, then one 3 x 3
        convolution of stride 2 per halving down to `stride` (a power of two), GELU
        between them and doubling channels up to `width`. A window is then 1 + 2 * stride
        pixels wide (9 for stride 4) and described nonlinearly: textures
        (fluid's flat grey, a lung without markings) as well as edges, which the linear
        window embedding mostly sees."""
        halvings = stride.bit_length() - 1
        x = images
        for i in range(halvings + 1):  # Layer i: width / 2^(halvings - i) channels.
            if i:
                x = nn.gelu(x)
            # Stride-2 layers pad after, the last before: their shifts (half their input's
            # spacing each) cancel but for half a pixel, so window i is centred on cell i.
            step, pad = (1, (1, 1)) if i == 0 else (2, (0, 1) if i < halvings else (1, 0))
            x = nn.Conv(max(self.width >> (halvings - i), 8), (3, 3), (step, step),
                        padding=(pad, pad), dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=logical(nn.initializers.lecun_normal(),
                                            ("conv_height", "conv_width", None, "embed")),
                        bias_init=logical(nn.initializers.zeros, ("embed",)),
                        name=f"stem_{i}")(x)
        return x


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

    Images are float (normalised) or integer (normalised here with `image_mean` /
    `image_std`: `normalize_pixels`).

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
    attention_pad_multiple: int | None = None
    remat_policy: str = "full"
    scan_unroll: int = 1
    patch_embed: str = "dense"
    image_mean: float = 0.0
    image_std: float = 1.0

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        if images.ndim != 4 or images.shape[-1] != self.num_channels:
            raise ValueError(
                f"images must be [batch, height, width, {self.num_channels}]; got {images.shape}"
            )
        if images.shape[1] % self.patch_size or images.shape[2] % self.patch_size:
            raise ValueError(f"image size {images.shape[1:3]} is not divisible by the patch "
                             f"size {self.patch_size}")
        images = normalize_pixels(images, self.image_mean, self.image_std, self.dtype)
        x = PatchEmbed(self.patch_size, self.width, self.patch_embed, self.dtype,
                       self.param_dtype, name="patch_embed")(images)
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
            attention_pad_multiple=self.attention_pad_multiple,
            remat_policy=self.remat_policy,
            scan_unroll=self.scan_unroll,
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
