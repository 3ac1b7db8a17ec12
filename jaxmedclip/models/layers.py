"""Transformer building blocks shared by the image and text towers.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv`, ...) through
`nn.with_logical_partitioning`; `jaxmedclip.parallel` maps them to mesh axes.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxmedclip import config_schema

Dtype = Any

dense_init = nn.initializers.xavier_uniform()
embed_init = nn.initializers.normal(stddev=0.02)


def logical(init, names: tuple[str | None, ...]):
    """An initializer whose parameter carries the logical axis `names`."""
    return nn.with_logical_partitioning(init, names)


def layer_norm(dtype: Dtype, param_dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=1e-6,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=logical(nn.initializers.ones, ("embed",)),
        bias_init=logical(nn.initializers.zeros, ("embed",)),
        name=name,
    )


# `jax.nn.dot_product_attention` implementations (config_schema.ATTENTION_IMPLS): None
# (XLA), "xla", or "cudnn" (fused flash attention on NVIDIA GPUs; bfloat16/float16 only).
ATTENTION_IMPLS = config_schema.ATTENTION_IMPLS

# The attention core's output is named, so that a rematerialisation policy can keep it.
ATTENTION_OUT = "attention_out"

# What a rematerialised block keeps from its forward pass (config_schema.REMAT_POLICIES);
# everything else is recomputed in the backward pass. "full": only the block's input.
REMAT_POLICIES = {
    "full": None,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention": jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT),
    "save_dots_and_attention": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT),
    ),
}


def attention_pad_multiple(implementation: str | None, pad_multiple: int | None) -> int:
    """The multiple sequence lengths are padded to inside the attention call.

    None: 2 for cuDNN (its training kernels refuse odd lengths once a mask is passed, e.g.
    the ViT's 197 tokens or a 77-token text), else 1 (no padding).
    """
    if pad_multiple is None:
        return 2 if implementation == "cudnn" else 1
    if pad_multiple < 1:
        raise ValueError(f"model.attention_pad_multiple must be >= 1; got {pad_multiple}")
    return pad_multiple


def padded_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, is_causal: bool,
                     kv_lengths: jax.Array | None, implementation: str | None,
                     pad_multiple: int = 1) -> jax.Array:
    """`jax.nn.dot_product_attention` over [batch, length, heads, head_dim], with query and
    key/value lengths padded up to a multiple of `pad_multiple`.

    The true lengths go to the kernel as sequence lengths, so padded keys are never
    attended to; padded query rows are dropped from the result: equal to the unpadded call.
    """
    q_len, kv_len = q.shape[1], k.shape[1]
    pad_q, pad_kv = -q_len % pad_multiple, -kv_len % pad_multiple
    q_lengths = None
    if pad_q or pad_kv:
        if kv_lengths is None:
            kv_lengths = jnp.full((k.shape[0],), kv_len, jnp.int32)
        q_lengths = jnp.full((q.shape[0],), q_len, jnp.int32)
        pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0)))
        q, k, v = pad(q, pad_q), pad(k, pad_kv), pad(v, pad_kv)
    out = jax.nn.dot_product_attention(
        q,
        k,
        v,
        is_causal=is_causal,
        query_seq_lengths=q_lengths,
        key_value_seq_lengths=kv_lengths,
        implementation=implementation,
    )
    return out[:, :q_len]


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections ([embed] -> [heads, kv]).

    Masking is structural, so that fused kernels can apply it: `is_causal`, and
    `kv_lengths` [batch] (keys at positions >= the row's length are ignored: trailing
    padding). Self-attention projects q, k and v in one matmul (the parameters stay
    three). `pad_multiple`: see `padded_attention`.
    """

    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    implementation: str | None = None
    pad_multiple: int = 1

    @nn.compact
    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_kv: jax.Array,
        kv_lengths: jax.Array | None = None,
        is_causal: bool = False,
    ) -> jax.Array:
        width = inputs_q.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
        head_dim = width // self.num_heads

        def param(name, shape, names, in_axis, out_axis):
            init = nn.initializers.xavier_uniform(in_axis=in_axis, out_axis=out_axis)
            return self.param(name, logical(init, names), shape, self.param_dtype)

        def projection(name):
            kernel = param(
                f"{name}_kernel",
                (width, self.num_heads, head_dim),
                ("embed", "heads", "kv"),
                0,
                (1, 2),
            )
            bias = self.param(
                f"{name}_bias",
                logical(nn.initializers.zeros, ("heads", "kv")),
                (self.num_heads, head_dim),
                self.param_dtype,
            )
            return kernel.astype(self.dtype), bias.astype(self.dtype)

        def project(x, kernel, bias):
            return jnp.einsum("...d,dhk->...hk", x.astype(self.dtype), kernel) + bias

        names = ("query", "key", "value")
        if inputs_q is inputs_kv:  # One matmul of width 3 * width, then split.
            kernels, biases = zip(*(projection(name) for name in names), strict=True)
            qkv = jnp.einsum("...d,dthk->...thk", inputs_q.astype(self.dtype),
                             jnp.stack(kernels, axis=1))
            q, k, v = (qkv[..., i, :, :] + biases[i] for i in range(3))
        else:
            q = project(inputs_q, *projection("query"))
            k = project(inputs_kv, *projection("key"))
            v = project(inputs_kv, *projection("value"))
        with jax.named_scope("dot_product_attention"):  # Profiles group attention by it.
            out = padded_attention(q, k, v, is_causal=is_causal, kv_lengths=kv_lengths,
                                   implementation=self.implementation,
                                   pad_multiple=self.pad_multiple)
        out = checkpoint_name(out, ATTENTION_OUT)
        out_kernel = param(
            "out_kernel", (self.num_heads, head_dim, width), ("heads", "kv", "embed"), (0, 1), 2
        )
        out_bias = self.param(
            "out_bias", logical(nn.initializers.zeros, ("embed",)), (width,), self.param_dtype
        )
        out = jnp.einsum("...hk,hkd->...d", out, out_kernel.astype(self.dtype))
        return out + out_bias.astype(self.dtype)


class Mlp(nn.Module):
    """Two dense layers with GELU: [embed] -> [mlp] -> [embed]."""

    hidden_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        x = nn.Dense(
            self.hidden_dim,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=logical(dense_init, ("embed", "mlp")),
            bias_init=logical(nn.initializers.normal(stddev=1e-6), ("mlp",)),
            name="fc1",
        )(x)
        x = nn.gelu(x, approximate=True)
        return nn.Dense(
            width,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=logical(dense_init, ("mlp", "embed")),
            bias_init=logical(nn.initializers.normal(stddev=1e-6), ("embed",)),
            name="fc2",
        )(x)


class Block(nn.Module):
    """Pre-LayerNorm transformer block (or post-LayerNorm, BERT's layout, with `post_norm`).

    Returns (x, None) so that it can be scanned.
    """

    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    post_norm: bool = False
    causal: bool = False
    attention_impl: str | None = None
    attention_pad_multiple: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, kv_lengths: jax.Array | None) -> tuple[jax.Array, None]:
        x = nn.with_logical_constraint(
            x, ("activation_batch", "activation_seq", "activation_embed")
        )
        attn = functools.partial(
            Attention(
                self.num_heads,
                self.dtype,
                self.param_dtype,
                self.attention_impl,
                self.attention_pad_multiple,
                name="attn",
            ),
            kv_lengths=kv_lengths,
            is_causal=self.causal,
        )
        mlp = Mlp(self.mlp_dim, self.dtype, self.param_dtype, name="mlp")
        norm1 = layer_norm(self.dtype, self.param_dtype, "norm1")
        norm2 = layer_norm(self.dtype, self.param_dtype, "norm2")
        if self.post_norm:
            x = norm1(x + attn(x, x))
            return norm2(x + mlp(x)), None
        y = norm1(x)
        x = x + attn(y, y)
        x = x + mlp(norm2(x))
        return x, None


class Encoder(nn.Module):
    """A stack of `depth` blocks, optionally rematerialised and/or scanned over layers.

    `remat`: each block's forward is recomputed in the backward pass, keeping what
    `remat_policy` (a key of REMAT_POLICIES) saves. `scan_layers`: the blocks are one
    `nn.scan` over stacked parameters, `scan_unroll` blocks per loop iteration.

    Attention is `causal` or not, over the first `kv_lengths` [batch] positions of each
    row (None: all).

    Pre-LayerNorm blocks end with a final LayerNorm; post-LayerNorm ones (`post_norm`,
    BERT's layout) need none.
    """

    depth: int
    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    scan_layers: bool = False
    post_norm: bool = False
    causal: bool = False
    attention_impl: str | None = None
    attention_pad_multiple: int | None = None
    remat_policy: str = "full"
    scan_unroll: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, kv_lengths: jax.Array | None = None) -> jax.Array:
        block = Block
        if self.remat:
            if self.remat_policy not in REMAT_POLICIES:
                raise ValueError(f"model.remat_policy={self.remat_policy!r} is unknown; "
                                 f"choose one of {tuple(REMAT_POLICIES)} or 'none'")
            block = nn.remat(block, prevent_cse=not self.scan_layers,
                             policy=REMAT_POLICIES[self.remat_policy])
        kwargs = dict(
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            post_norm=self.post_norm,
            causal=self.causal,
            attention_impl=self.attention_impl,
            attention_pad_multiple=attention_pad_multiple(
                self.attention_impl, self.attention_pad_multiple),
        )
        if self.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=nn.broadcast,
                length=self.depth,
                unroll=self.scan_unroll,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = stack(**kwargs, name="blocks")(x, kv_lengths)
        else:
            for i in range(self.depth):
                x, _ = block(**kwargs, name=f"block_{i}")(x, kv_lengths)
        if self.post_norm:
            return x
        return layer_norm(self.dtype, self.param_dtype, "final_norm")(x)
