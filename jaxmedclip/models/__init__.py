"""Model registry: configs name towers by string; `build_model` turns a config into modules."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from jaxmedclip.models.layers import ATTENTION_IMPLS
from jaxmedclip.models.text import LAYOUTS, VARIANTS, TextTransformer
from jaxmedclip.models.text import POOLS as TEXT_POOLS
from jaxmedclip.models.two_tower import TwoTower, l2_normalize
from jaxmedclip.models.vit import POOLS, ViT
from jaxmedclip.vocabulary import EOS_ID, PAD_ID

IMAGE_TOWERS = {"vit": ViT}
TEXT_TOWERS = {"transformer": TextTransformer}
MODELS = {"two_tower": TwoTower}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Fixed special token ids of our SentencePiece models (input_pipeline.tokenizer).

__all__ = ["build_model", "TwoTower", "ViT", "TextTransformer", "l2_normalize"]


def _choice(field: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"{field}={value!r} is unknown; choose one of {sorted(options, key=str)}")


def _dtype(field: str, name: str):
    _choice(field, name, DTYPES)
    return DTYPES[name]


def build_model(
    model_config: ml_collections.ConfigDict, data_config: ml_collections.ConfigDict
) -> TwoTower:
    """Builds the two-tower model; checks every field before any work is done.

    The image size, vocabulary size and text length come from `data_config`, so that the
    model always matches the data it is fed.
    """
    _choice("model.name", model_config.name, MODELS)
    image_cfg, text_cfg = model_config.image, model_config.text
    _choice("model.image.name", image_cfg.name, IMAGE_TOWERS)
    _choice("model.text.name", text_cfg.name, TEXT_TOWERS)
    _choice("model.image.pool", image_cfg.pool, POOLS)
    _choice("model.text.variant", text_cfg.variant, VARIANTS)
    # Options added after the first configs: absent means today's behaviour.
    text_pool = text_cfg.get("pool", None)
    if text_pool is not None:
        _choice("model.text.pool", text_pool, TEXT_POOLS)
    text_layout = text_cfg.get("layout", "pre_ln")
    _choice("model.text.layout", text_layout, LAYOUTS)
    image_projection = bool(model_config.get("image_projection", True))
    if not image_projection and image_cfg.width != model_config.embed_dim:
        raise ValueError(
            f"model.image_projection=False needs model.image.width ({image_cfg.width}) == "
            f"model.embed_dim ({model_config.embed_dim})"
        )
    attention_impl = model_config.get("attention_impl", None)
    _choice("model.attention_impl", attention_impl, ATTENTION_IMPLS)
    dtype = _dtype("model.dtype", model_config.dtype)
    if attention_impl == "cudnn" and dtype == jnp.float32:
        raise ValueError(
            'model.attention_impl="cudnn" needs model.dtype bfloat16 or float16; got float32'
        )
    param_dtype = _dtype("model.param_dtype", model_config.param_dtype)
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
    common = dict(
        dtype=dtype,
        param_dtype=param_dtype,
        remat=model_config.remat,
        scan_layers=model_config.scan_layers,
        attention_impl=attention_impl,
    )
    image_tower = IMAGE_TOWERS[image_cfg.name](
        patch_size=patch,
        width=image_cfg.width,
        depth=image_cfg.depth,
        num_heads=image_cfg.num_heads,
        mlp_ratio=image_cfg.mlp_ratio,
        pool=image_cfg.pool,
        num_channels=image_cfg.num_channels,
        pre_norm=bool(image_cfg.get("pre_norm", False)),
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
        pool=text_pool,
        layout=text_layout,
        **common,
    )
    return MODELS[model_config.name](
        image_tower=image_tower,
        text_tower=text_tower,
        embed_dim=model_config.embed_dim,
        temperature_init=model_config.temperature_init,
        max_scale=model_config.max_scale,
        bias_init=model_config.bias_init,
        image_projection=image_projection,
        local_dim=model_config.get("local_dim"),
        dtype=dtype,
        param_dtype=param_dtype,
    )
