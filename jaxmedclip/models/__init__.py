"""Model registry: configs name towers by string; `build_model` turns a config into modules."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from jaxmedclip import config_schema
from jaxmedclip.models import layers
from jaxmedclip.models.text import TextTransformer
from jaxmedclip.models.two_tower import LOCAL_PARAMS, TwoTower, l2_normalize
from jaxmedclip.models.vit import LocalPatchHead, ViT
from jaxmedclip.vocabulary import EOS_ID, PAD_ID

IMAGE_TOWERS = {"vit": ViT}
TEXT_TOWERS = {"transformer": TextTransformer}
MODELS = {"two_tower": TwoTower}
data_defaults = config_schema.FIELDS["data"]
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

__all__ = ["build_model", "LOCAL_PARAMS", "TwoTower", "ViT", "TextTransformer", "l2_normalize"]


def remat_policy_of(model_config: ml_collections.ConfigDict) -> str:
    """`model.remat_policy`, or what `model.remat` implies when it is None."""
    if model_config.get("remat_policy") is not None:
        return model_config.remat_policy
    return "full" if model_config.remat else "none"


def build_model(
    model_config: ml_collections.ConfigDict, data_config: ml_collections.ConfigDict
) -> TwoTower:
    """Builds the two-tower model; checks every field before any work is done.

    The image size, vocabulary size and text length come from `data_config`, so that the
    model always matches the data it is fed. `model_config`'s fields, their defaults and
    choices are declared in `config_schema` (and checked there).
    """
    model_config = ml_collections.ConfigDict(
        config_schema.complete_section("model", model_config))
    image_cfg, text_cfg = model_config.image, model_config.text
    image_projection = model_config.image_projection
    if not image_projection and image_cfg.width != model_config.embed_dim:
        raise ValueError(
            f"model.image_projection=False needs model.image.width ({image_cfg.width}) == "
            f"model.embed_dim ({model_config.embed_dim})"
        )
    attention_impl = model_config.attention_impl
    dtype = DTYPES[model_config.dtype]
    if attention_impl == "cudnn" and dtype == jnp.float32:
        raise ValueError(
            'model.attention_impl="cudnn" needs model.dtype bfloat16 or float16; got float32'
        )
    param_dtype = DTYPES[model_config.param_dtype]
    size, patch = data_config.image_size, image_cfg.patch_size
    if size % patch:
        fits = [p for p in range(1, size + 1) if size % p == 0 and 4 <= p <= 32]
        raise ValueError(
            f"data.image_size={size} is not divisible by model.image.patch_size={patch}; "
            f"patch sizes that fit: {fits}"
        )
    for tower, cfg in (("image", image_cfg), ("text", text_cfg)):
        if cfg.width % cfg.num_heads:
            raise ValueError(
                f"model.{tower}.width={cfg.width} is not divisible by "
                f"model.{tower}.num_heads={cfg.num_heads}"
            )
    if model_config.scan_unroll < 1:
        raise ValueError(f"model.scan_unroll must be >= 1; got {model_config.scan_unroll}")
    pad_multiple = layers.attention_pad_multiple(attention_impl,
                                                 model_config.attention_pad_multiple)
    remat_policy = remat_policy_of(model_config)
    common = dict(
        dtype=dtype,
        param_dtype=param_dtype,
        remat=remat_policy != "none",
        remat_policy="full" if remat_policy == "none" else remat_policy,
        scan_layers=model_config.scan_layers,
        scan_unroll=model_config.scan_unroll,
        attention_impl=attention_impl,
        attention_pad_multiple=pad_multiple,
    )
    image_tower = IMAGE_TOWERS[image_cfg.name](
        patch_size=patch,
        width=image_cfg.width,
        depth=image_cfg.depth,
        num_heads=image_cfg.num_heads,
        mlp_ratio=image_cfg.mlp_ratio,
        pool=image_cfg.pool,
        num_channels=image_cfg.num_channels,
        pre_norm=image_cfg.pre_norm,
        patch_embed=image_cfg.patch_embed,
        image_mean=data_config.get("image_mean", data_defaults["image_mean"].default),
        image_std=data_config.get("image_std", data_defaults["image_std"].default),
        **common,
    )
    text_tower = TEXT_TOWERS[text_cfg.name](
        vocab_size=data_config.vocab_size,
        max_len=data_config.max_text_len,
        width=text_cfg.width,
        depth=text_cfg.depth,
        num_heads=text_cfg.num_heads,
        mlp_ratio=text_cfg.mlp_ratio,
        variant=text_cfg.variant,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        pool=text_cfg.pool,
        layout=text_cfg.layout,
        **common,
    )
    local_head = None
    if model_config.local_dim is not None and model_config.local_source == "patches":
        kernels = tuple(int(k) for k in model_config.local_head_kernels)
        if model_config.local_head_depth < 0 or not kernels or min(kernels) < 1:
            raise ValueError(
                f"model.local_head_depth ({model_config.local_head_depth}) must be >= 0 and "
                f"model.local_head_kernels ({model_config.local_head_kernels}) a non-empty "
                "list of sizes >= 1")
        stride = model_config.local_head_stride or patch
        if not 1 <= stride <= patch or size % stride:
            raise ValueError(f"model.local_head_stride={stride} must be in [1, "
                             f"model.image.patch_size={patch}] and divide data.image_size={size}")
        stem = model_config.local_head_stem
        if stem == "conv" and stride & (stride - 1):
            raise ValueError(f"model.local_head_stem='conv' halves the image down to "
                             f"model.local_head_stride={stride}: it must be a power of two")
        local_head = LocalPatchHead(
            patch_size=patch,
            stride=stride,
            stem=stem,
            width=model_config.local_head_width or image_cfg.width,
            depth=model_config.local_head_depth,
            kernels=kernels,
            dtype=dtype,
            param_dtype=param_dtype,
            image_mean=image_tower.image_mean,
            image_std=image_tower.image_std,
        )
    return MODELS[model_config.name](
        image_tower=image_tower,
        text_tower=text_tower,
        embed_dim=model_config.embed_dim,
        temperature_init=model_config.temperature_init,
        max_scale=model_config.max_scale,
        bias_init=model_config.bias_init,
        image_projection=image_projection,
        local_dim=model_config.local_dim,
        local_head=local_head,
        local_text=model_config.local_text,
        local_stop_gradient=model_config.local_stop_gradient,
        dtype=dtype,
        param_dtype=param_dtype,
    )
