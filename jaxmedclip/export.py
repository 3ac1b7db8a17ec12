"""Export entry point: checkpoint -> a Hugging Face `transformers` folder (safetensors).

  python -m jaxmedclip.export --config experiments/x.py --workdir /tmp/run --out /tmp/hf \
      [--checkpoint STEP] [--format auto|clip|siglip|dual_encoder] [--tokenizer spm.model] \
      [--overwrite] [--allow_inexact_tokenizer] [--parity_atol 1e-4] [--config.field=value ...]

The folder loads with `AutoModel`, `AutoTokenizer` and `AutoImageProcessor` and no custom
code. A config that the chosen `transformers` class cannot express is refused with the
option that blocks it and the formats that would accept it (see docs/pytorch.md).

The tokenizer is the one training recorded in `<workdir>/tokenizer.model` (or
`--tokenizer`). The folder is written beside `--out` under a temporary name, loaded back
and compared with the JAX model (embeddings, logits, token ids), and only then renamed
into place; an existing `--out` is replaced only with `--overwrite`, and only then. No
tensorflow is imported: in one process, tensorflow followed by the triton that the CUDA
build of torch loads crashes (issue #21).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import sys
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import ml_collections
import numpy as np

from jaxmedclip.convert import layouts, parity, towers
from jaxmedclip.convert.tokenizer import check_exact, save_tokenizer
from jaxmedclip.vocabulary import BOS_ID, EOS_ID, PAD_ID

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
        "model.image.pre_norm": image.pre_norm,
        "model.text.variant": text.variant,
        "model.text.pool": text.pool or ("eos" if text.variant == "causal" else "first"),
        "model.text.layout": text.layout,
        "model.image_projection": model.image_projection,
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
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        # CLIP pools at the first `eos_token_id` (our EOS is 3, so not its legacy argmax path).
        eos_token_id=EOS_ID,
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


class ExportError(RuntimeError):
    """The export did not produce a folder (nothing was written at `--out`)."""


class Exported(NamedTuple):
    format: str
    parity: parity.ParityReport


def find_tokenizer(workdir: str, config: ml_collections.ConfigDict) -> str:
    """The SentencePiece model the run in `workdir` was trained with.

    Training copies it to `<workdir>/tokenizer.model`; a workdir written before that has
    none, and the error names `--tokenizer` and the models found where the data config's
    tokenizer usually lives (without building the dataset, which needs tensorflow).
    """
    from jaxmedclip import training

    path = os.path.join(workdir, training.WORKDIR_TOKENIZER)
    if os.path.isfile(path):
        return path
    data = config.data
    name = f"spm_{data.tokenizer_type}_{data.vocab_size}.model"
    data_dir = (
        data.data_dir
        or os.environ.get("JAXMEDCLIP_DATA_DIR")
        or os.path.expanduser("~/.cache/jaxmedclip/tfds")
    )
    pattern = os.path.join(data_dir, data.name, "**", "tokenizer", name)
    found = sorted(glob.glob(pattern, recursive=True)) if "://" not in data_dir else []
    where = (
        "models of that name (one per dataset configuration; take the run's): " + ", ".join(found)
        if found
        else f"none found under {os.path.join(data_dir, data.name)}"
    )
    raise FileNotFoundError(
        f"{path} does not exist (runs from before tokenizers were recorded in the workdir "
        "have none). Pass --tokenizer PATH with the SentencePiece .model the run was trained "
        f"with; training reads it from <data dir>/{data.name}/<config>/<version>/tokenizer/"
        f"{name} ({where})"
    )


def check_out(out: str, overwrite: bool) -> None:
    """Refuses an `--out` that is a file, or a non-empty folder without `overwrite`."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise FileExistsError(f"--out {out} exists and is not a folder; choose another --out")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise FileExistsError(
            f"--out {out} exists and is not empty; pass --overwrite to replace it (it is "
            "replaced only once the new export is complete and has passed its checks)"
        )


def _sibling(out: str, what: str) -> str:
    """A hidden name beside `out` that no loader is pointed at."""
    parent, name = os.path.split(os.path.abspath(out))
    return os.path.join(parent, f".{name}.{what}-{uuid.uuid4().hex[:12]}")


def write_folder(
    folder: str,
    config: ml_collections.ConfigDict,
    fmt: str,
    tensors: Mapping[str, np.ndarray],
    tokenizer_model: str,
    allow_inexact_tokenizer: bool = False,
) -> None:
    """Writes the Hugging Face files into the existing `folder`; config.json last, so
    that a folder left by a killed export does not load."""
    from safetensors.numpy import save_file

    scale = math.exp(float(tensors["logit_scale"].reshape(())))
    weights = os.path.join(folder, "model.safetensors")
    save_file(dict(tensors), weights, metadata={"format": "pt"})
    # safetensors writes through a private temporary file (mode 0600); give the weights
    # the permissions of the other files, so a shared folder is readable by its users.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(weights, 0o666 & ~umask)
    save_tokenizer(tokenizer_model, config.data.max_text_len, folder, allow_inexact_tokenizer)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump(image_processor_config(config, fmt), f, indent=2)
    hf_config(config, fmt, scale).save_pretrained(folder)


def _publish(partial: str, out: str) -> None:
    """Renames the finished `partial` folder to `out`; an existing `out` is moved aside
    first and deleted only once the new folder is in place (put back if that fails)."""
    if not os.path.lexists(out):
        os.rename(partial, out)
        return
    aside = _sibling(out, "replaced")
    os.rename(out, aside)
    try:
        os.rename(partial, out)
    except BaseException:
        os.rename(aside, out)
        raise
    shutil.rmtree(aside)


def export(
    config: ml_collections.ConfigDict,
    params: Mapping,
    tokenizer_model: str,
    out: str,
    fmt: str = "auto",
    allow_inexact_tokenizer: bool = False,
    *,
    overwrite: bool = False,
    parity_atol: float = parity.DEFAULT_ATOL,
) -> Exported:
    """Writes the Hugging Face folder `out` after checking it against the JAX model.

    The files go to a hidden folder beside `out`, which is loaded back with the Auto
    classes and compared with our model on a few images and texts (`convert.parity`);
    only if every tensor loads and the embeddings, logits and token ids agree is it
    renamed to `out`. On any failure the hidden folder is removed and `out` is as before.
    A tokenizer that `tokenizer.json` cannot reproduce exactly (a unigram model) is
    refused before anything is written, unless `allow_inexact_tokenizer`.
    """
    from input_pipeline.tokenizer import Tokenizer  # SentencePiece only, no tensorflow.

    fmt = choose_format(config, fmt)
    check_exact(tokenizer_model, allow_inexact_tokenizer)
    check_out(out, overwrite)
    tensors = hf_state_dict(params, config, fmt)
    our_tokens = Tokenizer(tokenizer_model, config.data.max_text_len).encode_batch(
        parity.SAMPLE_TEXTS
    )
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    partial = _sibling(out, "partial")
    os.mkdir(partial)
    try:
        write_folder(partial, config, fmt, tensors, tokenizer_model, allow_inexact_tokenizer)
        try:
            report = parity.check_folder(
                partial, HF_CLASSES[fmt], config, params, our_tokens, atol=parity_atol
            )
        except RuntimeError as e:
            raise ExportError(f"nothing was written to {out}: {e}") from e
        problems = report.problems()
        if problems:
            raise ExportError(
                "the exported model does not compute what the JAX model computes, so nothing "
                f"was written to {out}: " + "; ".join(problems) + f" ({report.summary()})"
            )
        _publish(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # Gone already when published.
    return Exported(fmt, report)


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
        help="SentencePiece .model (default: <workdir>/tokenizer.model, recorded by training)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out (only after the new export has passed its checks)",
    )
    parser.add_argument(
        "--allow_inexact_tokenizer",
        action="store_true",
        help="export a unigram tokenizer although tokenizers breaks its score ties differently",
    )
    parser.add_argument(
        "--parity_atol",
        type=float,
        default=parity.DEFAULT_ATOL,
        help="largest accepted difference of the embeddings (logits: times the scale) "
        "between transformers and JAX in the self-check",
    )
    own, rest = parser.parse_known_args(argv)
    from jaxmedclip import train

    args, overrides = train.parse_flags(rest)
    return own, args, overrides


def main(argv: Sequence[str] | None = None) -> str:
    """Runs the export; returns the format written. Refusals come before any work."""
    own, args, overrides = parse_flags(sys.argv[1:] if argv is None else argv)
    from jaxmedclip import config_lib, evaluate, models

    config = config_lib.config_from_flags(args.config, overrides)
    fmt = choose_format(config, own.format)
    check_out(own.out, own.overwrite)
    checkpoints = os.path.join(os.path.abspath(args.workdir), "checkpoints")
    if not os.path.isdir(checkpoints):
        raise FileNotFoundError(
            f"{checkpoints} does not exist; train into --workdir {args.workdir} first"
        )
    tokenizer_model = own.tokenizer or find_tokenizer(args.workdir, config)
    if not os.path.isfile(tokenizer_model):
        raise FileNotFoundError(f"--tokenizer {tokenizer_model} does not exist")
    check_exact(tokenizer_model, own.allow_inexact_tokenizer)
    params, step = evaluate.restore_params(
        evaluate.model_setup(config), args.workdir, own.checkpoint
    )
    result = export(
        config,
        params,
        tokenizer_model,
        own.out,
        fmt,
        own.allow_inexact_tokenizer,
        overwrite=own.overwrite,
        parity_atol=own.parity_atol,
    )
    print(f"self-check: {result.parity.summary()}")
    local = sorted(set(params) & set(models.LOCAL_PARAMS))
    if local:
        print(f"not exported: the local alignment's {', '.join(local)} (grounding maps of "
              "this model need its checkpoint: python -m jaxmedclip.ground --workdir ...)")
    print(
        f"exported step {step} of {args.workdir} as {result.format} "
        f"({HF_CLASSES[result.format]}) to {own.out} (tokenizer {tokenizer_model})"
    )
    return result.format


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError, ExportError) as e:
        raise SystemExit(f"error: {e}") from None
