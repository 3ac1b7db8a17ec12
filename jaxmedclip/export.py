"""Export entry point: checkpoint -> a Hugging Face `transformers` folder (safetensors).

  python -m jaxmedclip.export --config experiments/x.py --workdir /tmp/run --out /tmp/hf \
      [--checkpoint STEP] [--format auto|clip|siglip|dual_encoder] [--tokenizer spm.model] \
      [--allow_inexact_tokenizer] [--config.field=value ...]

The folder loads with `AutoModel`, `AutoTokenizer` and `AutoImageProcessor` and no custom
code. A config that the chosen `transformers` class cannot express is refused with the
option that blocks it and the formats that would accept it (see docs/pytorch.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from jaxmedclip.convert import layouts, towers
from jaxmedclip.convert.tokenizer import check_exact, save_tokenizer

FORMATS = ("clip", "siglip", "dual_encoder")
HF_CLASSES = {
    "clip": "CLIPModel",
    "siglip": "SiglipModel",
    "dual_encoder": "VisionTextDualEncoderModel",
}
ACT = "gelu_pytorch_tanh"  # Our GELU is the tanh approximation.
LAYER_NORM_EPS = 1e-6

# option -> {format: the values its transformers class can express}.
ACCEPTED: dict[str, dict[str, tuple]] = {
    "model.image.name": {f: ("vit",) for f in FORMATS},
    "model.text.name": {f: ("transformer",) for f in FORMATS},
    "model.image.pool": {"clip": ("cls",), "siglip": ("map",), "dual_encoder": ("cls", "map")},
    "model.image.pre_norm": {"clip": (True,), "siglip": (False,), "dual_encoder": (True, False)},
    "model.text.variant": {
        "clip": ("causal",),
        "siglip": ("bidirectional",),
        "dual_encoder": ("bidirectional",),
    },
    "model.text.pool": {"clip": ("eos",), "siglip": ("last",), "dual_encoder": ("first",)},
    "model.text.layout": {"clip": ("pre_ln",), "siglip": ("pre_ln",), "dual_encoder": ("bert",)},
    "model.image_projection": {"clip": (True,), "siglip": (False,), "dual_encoder": (True,)},
    # CLIPModel and the dual encoder have no logit bias; SigLIP's is ours (0 when unused).
    "loss.name": {
        "clip": ("softmax",),
        "siglip": ("softmax", "sigmoid"),
        "dual_encoder": ("softmax",),
    },
}
WHY = {
    "model.image.pool": "the pooling of the vision tower",
    "model.image.pre_norm": "CLIP's vision tower has a LayerNorm before the first block "
    "(`pre_layrnorm`), SigLIP's has none",
    "model.text.variant": "CLIP's text tower is causal, BERT's and SigLIP's bidirectional",
    "model.text.pool": "CLIP pools at the first EOS, SigLIP at the last position, BERT at the "
    "first token",
    "model.text.layout": "BERT is post-LayerNorm with an embedding LayerNorm and a tanh pooler",
    "model.image_projection": "SigLIP's image embedding is the attention-pool output itself",
    "loss.name": "the sigmoid loss learns a logit bias",
}


def options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The effective value of every option an export depends on (defaults filled in)."""
    model, image, text = config.model, config.model.image, config.model.text
    return {
        "model.image.name": image.name,
        "model.text.name": text.name,
        "model.image.pool": image.pool,
        "model.image.pre_norm": bool(image.get("pre_norm", False)),
        "model.text.variant": text.variant,
        "model.text.pool": text.get("pool", None)
        or ("eos" if text.variant == "causal" else "first"),
        "model.text.layout": text.get("layout", "pre_ln"),
        "model.image_projection": bool(model.get("image_projection", True)),
        "loss.name": config.loss.name,
    }


def choose_format(config: ml_collections.ConfigDict, requested: str = "auto") -> str:
    """`requested`, or for `auto` the format the config's towers point to; then checked."""
    opts = options(config)
    if requested == "auto":
        if opts["model.image.pool"] == "map" and opts["model.text.layout"] != "bert":
            requested = "siglip"
        elif opts["model.text.layout"] == "bert":
            requested = "dual_encoder"
        else:
            requested = "clip"
    if requested not in FORMATS:
        raise ValueError(f"--format {requested!r}; choose one of auto, {', '.join(FORMATS)}")
    check_format(config, requested)
    return requested


def check_format(config: ml_collections.ConfigDict, fmt: str) -> None:
    """Raises a ValueError naming every option `fmt` cannot express."""
    opts = options(config)
    problems = []
    for option, accepted in ACCEPTED.items():
        value = opts[option]
        if value in accepted[fmt]:
            continue
        others = [f for f in FORMATS if value in accepted[f]]
        where = f"formats that accept it: {', '.join(others)}" if others else "no format accepts it"
        why = f" ({WHY[option]})" if option in WHY else ""
        problems.append(
            f"{option}={value!r} cannot be exported as {fmt} ({HF_CLASSES[fmt]}){why}; {where}"
        )
    if opts["model.image.pool"] == "map" and opts["model.image.pre_norm"]:
        problems.append(
            "model.image.pre_norm=True with model.image.pool='map': no transformers vision "
            "model has both; no format accepts it"
        )
    if problems:
        raise ValueError("export refused:\n  " + "\n  ".join(problems))


def vision_table(config: ml_collections.ConfigDict) -> towers.TowerTable:
    opts = options(config)
    if opts["model.image.pool"] == "map":
        return towers.SIGLIP_VISION
    return towers.CLIP_VISION if opts["model.image.pre_norm"] else towers.VIT


def layout(config: ml_collections.ConfigDict, fmt: str) -> layouts.Layout:
    if fmt == "clip":
        return layouts.CLIP
    if fmt == "siglip":
        return layouts.SIGLIP
    return layouts.dual_encoder(vision_table(config))


def _tower_dims(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    return dict(
        hidden_size=cfg.width,
        intermediate_size=int(cfg.width * cfg.mlp_ratio),
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads,
        hidden_act=ACT,
        layer_norm_eps=LAYER_NORM_EPS,
    )


def _vision_dims(config: ml_collections.ConfigDict) -> dict[str, Any]:
    image = config.model.image
    return dict(
        _tower_dims(image),
        image_size=config.data.image_size,
        patch_size=image.patch_size,
        num_channels=image.num_channels,
    )


def _text_dims(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return dict(
        _tower_dims(config.model.text),
        vocab_size=config.data.vocab_size,
        max_position_embeddings=config.data.max_text_len,
        pad_token_id=0,
        bos_token_id=2,
        # CLIP pools at the first `eos_token_id` (our EOS is 3, so not its legacy argmax path).
        eos_token_id=3,
    )


def hf_config(config: ml_collections.ConfigDict, fmt: str, scale: float):
    """The `transformers` config of the exported model."""
    import transformers as tf_hf

    embed_dim = config.model.embed_dim
    if fmt == "clip":
        return tf_hf.CLIPConfig(
            text_config=dict(_text_dims(config), projection_dim=embed_dim),
            vision_config=dict(_vision_dims(config), projection_dim=embed_dim),
            projection_dim=embed_dim,
            logit_scale_init_value=math.log(scale),
        )
    if fmt == "siglip":
        return tf_hf.SiglipConfig(
            text_config=dict(_text_dims(config), projection_size=embed_dim),
            vision_config=dict(_vision_dims(config), vision_use_head=True),
        )
    table = vision_table(config)
    if table is towers.CLIP_VISION:
        vision = tf_hf.CLIPVisionConfig(**_vision_dims(config))
    elif table is towers.SIGLIP_VISION:
        vision = tf_hf.SiglipVisionConfig(**_vision_dims(config), vision_use_head=True)
    else:
        vision = tf_hf.ViTConfig(**_vision_dims(config), qkv_bias=True, pooler_act="linear")
    text_dims = _text_dims(config)
    text_dims.pop("bos_token_id"), text_dims.pop("eos_token_id")
    text = tf_hf.BertConfig(**text_dims, type_vocab_size=1)
    return tf_hf.VisionTextDualEncoderConfig.from_vision_text_configs(
        vision, text, projection_dim=embed_dim, logit_scale_init_value=math.log(scale)
    )


def hf_state_dict(
    params: Mapping, config: ml_collections.ConfigDict, fmt: str
) -> dict[str, np.ndarray]:
    """Our params as the exported model's float32 tensors.

    The scale is written clamped at `model.max_scale` (as our losses use it); a model not
    trained with the sigmoid loss gets a SigLIP logit bias of 0, so logits equal ours.
    """
    import jax

    params = jax.tree.map(lambda x: np.asarray(x, np.float32), dict(params))
    log_scale = min(float(params["log_scale"]), math.log(config.model.max_scale))
    params["log_scale"] = np.asarray(log_scale, np.float32)
    if config.loss.name != "sigmoid":
        params["bias"] = np.zeros((), np.float32)
    return layouts.to_hf(params, layout(config, fmt))


def image_processor_config(config: ml_collections.ConfigDict, fmt: str) -> dict[str, Any]:
    """preprocessor_config.json: resize to the square input, x/255, (x - mean) / std.

    Our pipeline keeps the aspect ratio and pads to a square (`image_preprocess`), which
    transformers' processors do not; docs/pytorch.md says what to do for non-square images.
    """
    size, channels = config.data.image_size, config.model.image.num_channels
    processor = {
        "clip": "CLIPImageProcessor",
        "siglip": "SiglipImageProcessor",
        "dual_encoder": "ViTImageProcessor",
    }[fmt]
    return {
        "image_processor_type": processor,
        "do_resize": True,
        "size": {"height": size, "width": size},
        "resample": 2,  # PIL bilinear, as tf.image.resize(..., "bilinear").
        "do_center_crop": False,
        "do_rescale": True,
        "rescale_factor": 1 / 255,  # 8-bit PNGs; 16-bit images: do_rescale=False on [0, 1].
        "do_normalize": True,
        "image_mean": [float(config.data.image_mean)] * channels,
        "image_std": [float(config.data.image_std)] * channels,
        "do_convert_rgb": False,
    }


def export(
    config: ml_collections.ConfigDict,
    params: Mapping,
    tokenizer_model: str,
    out: str,
    fmt: str = "auto",
    allow_inexact_tokenizer: bool = False,
) -> str:
    """Writes the Hugging Face folder `out`; returns the format used.

    A tokenizer that `tokenizer.json` cannot reproduce exactly (a unigram model) is
    refused before anything is written, unless `allow_inexact_tokenizer`.
    """
    import transformers as tf_hf
    from safetensors.numpy import save_file

    fmt = choose_format(config, fmt)
    check_exact(tokenizer_model, allow_inexact_tokenizer)
    tensors = hf_state_dict(params, config, fmt)
    scale = math.exp(float(tensors["logit_scale"].reshape(())))
    os.makedirs(out, exist_ok=True)
    hf_config(config, fmt, scale).save_pretrained(out)
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    # The tables name tensors as checkpoints hold them; loading checks every name.
    _, info = getattr(tf_hf, HF_CLASSES[fmt]).from_pretrained(out, output_loading_info=True)
    wrong = {k: v for k, v in info.items() if k != "error_msgs" and v} | (
        {"error_msgs": info["error_msgs"]} if info.get("error_msgs") else {}
    )
    if wrong:
        raise RuntimeError(
            f"{HF_CLASSES[fmt]} of transformers {tf_hf.__version__} does not load the exported "
            f"tensors exactly: {wrong}"
        )
    save_tokenizer(tokenizer_model, config.data.max_text_len, out, allow_inexact_tokenizer)
    with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
        json.dump(image_processor_config(config, fmt), f, indent=2)
    return fmt


def parse_flags(argv: Sequence[str]):
    parser = argparse.ArgumentParser(
        prog="python -m jaxmedclip.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--checkpoint", type=int, default=None, help="step (default: latest)")
    parser.add_argument("--format", default="auto", choices=("auto", *FORMATS))
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="SentencePiece .model (default: the data config's, built from the dataset)",
    )
    parser.add_argument(
        "--allow_inexact_tokenizer",
        action="store_true",
        help="export a unigram tokenizer although tokenizers breaks its score ties differently",
    )
    own, rest = parser.parse_known_args(argv)
    from jaxmedclip import train

    args, overrides = train.parse_flags(rest)
    return own, args, overrides


def main(argv: Sequence[str] | None = None) -> str:
    own, args, overrides = parse_flags(sys.argv[1:] if argv is None else argv)
    from jaxmedclip import config_lib, evaluate, train

    config = config_lib.config_from_flags(args.config, overrides)
    choose_format(config, own.format)  # Refuse before anything is restored.
    setup = train.build(config)
    params, step = evaluate.restore_params(setup, args.workdir, own.checkpoint)
    tokenizer_model = own.tokenizer
    if tokenizer_model is None:
        from input_pipeline import pipeline

        tokenizer_model = pipeline.prepare(config.data)[1].model_path
    fmt = export(config, params, tokenizer_model, own.out, own.format, own.allow_inexact_tokenizer)
    print(f"exported step {step} of {args.workdir} as {fmt} ({HF_CLASSES[fmt]}) to {own.out}")
    return fmt


if __name__ == "__main__":
    main()
