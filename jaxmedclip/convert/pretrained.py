"""Import: Hugging Face CLIP / SigLIP / ViT / BERT / dual-encoder weights into our towers.

    config.init_from = ml_collections.ConfigDict(dict(path="/models/hf_clip", towers=("image",)))
    params = convert.load_pretrained(params, config.init_from.path,
                                     towers=config.init_from.towers)

Only safetensors are read (pickled `.bin` files can run code when loaded). Every tensor
that does not fit (unknown name, missing, wrong shape) is listed in one error.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxmedclip.convert import layouts, rules, towers

# model_type in config.json -> {our tower: (table, prefix of its tensors)}.
STANDALONE = {
    "clip": {
        "image": (towers.CLIP_VISION, "vision_model."),
        "text": (towers.CLIP_TEXT, "text_model."),
    },
    "clip_vision_model": {"image": (towers.CLIP_VISION, "vision_model.")},
    "clip_text_model": {"text": (towers.CLIP_TEXT, "text_model.")},
    "siglip": {
        "image": (towers.SIGLIP_VISION, "vision_model."),
        "text": (towers.SIGLIP_TEXT, "text_model."),
    },
    "siglip_vision_model": {"image": (towers.SIGLIP_VISION, "vision_model.")},
    "siglip_text_model": {"text": (towers.SIGLIP_TEXT, "text_model.")},
    "vit": {"image": (towers.VIT, "")},
    "bert": {"text": (towers.BERT, "")},
}
_SUB_MODEL = {
    "clip_vision_model": towers.CLIP_VISION,
    "siglip_vision_model": towers.SIGLIP_VISION,
    "vit": towers.VIT,
}
# Buffers some checkpoints carry; they are not weights.
_BUFFERS = ("position_ids",)


def read_safetensors(folder: str) -> dict[str, np.ndarray]:
    """All tensors of the folder's `*.safetensors` files; refuses pickle-only folders."""
    from safetensors.numpy import load_file

    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        pickled = sorted(
            glob.glob(os.path.join(folder, "*.bin")) + glob.glob(os.path.join(folder, "*.pt"))
        )
        if pickled:
            raise ValueError(
                f"{folder} holds only pickled weights ({', '.join(map(os.path.basename, pickled))})"
                ", which can run code when loaded; convert them to safetensors first, e.g. "
                "`AutoModel.from_pretrained(folder).save_pretrained(out, safe_serialization=True)`"
                " in an environment you trust"
            )
        raise FileNotFoundError(f"no *.safetensors file in {folder}")
    tensors: dict[str, np.ndarray] = {}
    for path in files:
        tensors.update(load_file(path))
    return {k: v for k, v in tensors.items() if not k.endswith(_BUFFERS)}


def tower_sources(folder: str) -> dict[str, tuple[towers.TowerTable, str]]:
    """{image|text: (table, tensor prefix)} of the towers a Hugging Face folder holds."""
    with open(os.path.join(folder, "config.json")) as f:
        hf_config = json.load(f)
    model_type = hf_config.get("model_type")
    if model_type in STANDALONE:
        return dict(STANDALONE[model_type])
    if model_type == "vision-text-dual-encoder":
        vision_type = hf_config["vision_config"]["model_type"]
        text_type = hf_config["text_config"]["model_type"]
        sources = {}
        if vision_type in _SUB_MODEL:
            table = _SUB_MODEL[vision_type]
            sources["image"] = (table, layouts.DUAL_VISION_PREFIX[table.kind])
        if text_type == "bert":
            sources["text"] = (towers.BERT, "text_model.")
        return sources
    raise ValueError(
        f"{folder}: model_type {model_type!r} is not importable; supported: "
        f"{', '.join(sorted(STANDALONE))}, vision-text-dual-encoder"
    )


def load_pretrained(
    params: Mapping[str, Any],
    folder: str,
    towers: Sequence[str] = ("image", "text"),
    model_config: Any = None,
) -> dict[str, Any]:
    """`params` (our unboxed TwoTower tree) with `towers` replaced by the folder's weights.

    Returns host numpy arrays in the dtypes of `params`; place them with the state's
    shardings (`jax.device_put(new_params, shardings.params)`). Other parameters
    (projections, temperature) are returned unchanged. `model_config` (optional) only
    improves the error hints.
    """
    if isinstance(towers, str):
        towers = (towers,)
    sources = tower_sources(folder)
    unknown = [t for t in towers if t not in layouts.OUR_TOWERS]
    if unknown:
        raise ValueError(f"init_from.towers {unknown}: choose from {sorted(layouts.OUR_TOWERS)}")
    missing = [t for t in towers if t not in sources]
    if missing:
        raise ValueError(f"{folder} has no {' or '.join(missing)} tower; it has {sorted(sources)}")
    tensors = read_safetensors(folder)
    new_params = dict(params)
    problems = []
    for which in towers:
        table, prefix = sources[which]
        if prefix and not any(k.startswith(prefix) for k in tensors):
            # transformers 5 saves a standalone tower (CLIPVisionModel, ...) without the
            # `vision_model.` / `text_model.` prefix that transformers 4 wrote.
            prefix = ""
        root = layouts.OUR_TOWERS[which]
        ours_flat = rules.flatten(params[root])
        expected = rules.unstacked_shapes({k: np.shape(v) for k, v in ours_flat.items()})
        theirs = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        theirs = table.import_theirs(theirs)
        try:
            converted = rules.from_hf(
                theirs, list(table.rules), expected, what=f"{folder} ({table.kind}) -> {root}"
            )
        except rules.ConversionError as e:
            problems += [f"[{which}] {p}" for p in e.problems]
            continue
        converted = rules.stack_layers(converted, ours_flat)
        dtypes = {
            k: np.asarray(v).dtype if hasattr(v, "dtype") else np.float32
            for k, v in ours_flat.items()
        }
        new_params[root] = rules.unflatten(
            {k: np.asarray(converted[k], dtypes[k]) for k in ours_flat}
        )
    if problems:
        hints = _hints(problems, model_config)
        raise rules.ConversionError(f"cannot load {folder} into {list(towers)}", problems + hints)
    return new_params


def _hints(problems: list[str], model_config: Any) -> list[str]:
    text = "\n".join(problems)
    hints = []
    if "pre_layrnorm" in text:
        hints.append("hint: CLIP vision towers need model.image.pre_norm=True")
    if "image_tower/pre_norm" in text:
        hints.append("hint: this vision model has no pre-LayerNorm; set model.image.pre_norm=False")
    if "embeddings.LayerNorm" in text or "text_tower/embed_norm" in text:
        hints.append("hint: BERT text towers need model.text.layout='bert' (and the reverse)")
    if "class_embedding" in text or "cls_token" in text or "head.probe" in text:
        hints.append("hint: check model.image.pool (cls for CLIP/ViT, map for SigLIP)")
    if model_config is not None and "pos_embed" in text:
        hints.append(
            "hint: position tables must match data.image_size/patch_size and data.max_text_len"
        )
    return hints
