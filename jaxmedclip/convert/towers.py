"""Conversion tables of our towers against Hugging Face's CLIP, SigLIP, ViT and BERT.

Each `TowerTable` names tensors relative to our tower (`image_tower` / `text_tower`) and to
the Hugging Face tower module (`CLIPVisionTransformer`, `ViTModel`, ...). Where two
layouts differ by more than a per-tensor hook, a fold on whole dicts keeps the function
equal: CLIP's patch embedding has no bias (ours is added into the patch positions), BERT
adds a token-type row (ours is zero; an imported one goes into the positions), ViTModel
and BERT end in a pooler (ViT's is exported as the identity; BERT's is ours in the `bert`
layout).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping

import numpy as np

from jaxmedclip.convert.rules import (
    CONV,
    DENSE,
    DROP_LEAD,
    FLATTEN,
    OUT_KERNEL,
    QKV_KERNEL,
    Hook,
    Rule,
)

Tensors = dict[str, np.ndarray]


def _norm(ours: str, theirs: str) -> list[Rule]:
    return [Rule(f"{ours}/scale", f"{theirs}.weight"), Rule(f"{ours}/bias", f"{theirs}.bias")]


def _dense(ours: str, theirs: str, hook: Hook = DENSE) -> list[Rule]:
    return [
        Rule(f"{ours}/kernel", f"{theirs}.weight", hook),
        Rule(f"{ours}/bias", f"{theirs}.bias"),
    ]


def _attention(ours: str, q: str, k: str, v: str, out: str) -> list[Rule]:
    rules = []
    for name, theirs in (("query", q), ("key", k), ("value", v)):
        weight, bias = (
            (f"{theirs}.weight", f"{theirs}.bias")
            if "#" not in theirs
            else (theirs.replace("#", "_weight#"), theirs.replace("#", "_bias#"))
        )
        rules += [
            Rule(f"{ours}/{name}_kernel", weight, QKV_KERNEL),
            Rule(f"{ours}/{name}_bias", bias, FLATTEN),
        ]
    return rules + [
        Rule(f"{ours}/out_kernel", f"{out}.weight", OUT_KERNEL),
        Rule(f"{ours}/out_bias", f"{out}.bias"),
    ]


def _blocks(
    theirs: str, norm1: str, attn: tuple[str, str, str, str], norm2: str, fc1: str, fc2: str
) -> list[Rule]:
    """One transformer block per layer index `{i}`: ours `encoder/block_{i}`."""
    ours = "encoder/block_{i}"
    return (
        _norm(f"{ours}/norm1", theirs + norm1)
        + _attention(f"{ours}/attn", *(theirs + a for a in attn))
        + _norm(f"{ours}/norm2", theirs + norm2)
        + _dense(f"{ours}/mlp/fc1", theirs + fc1)
        + _dense(f"{ours}/mlp/fc2", theirs + fc2)
    )


def _clip_blocks() -> list[Rule]:
    attn = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
    return _blocks("encoder.layers.{i}.", "layer_norm1", attn, "layer_norm2", "mlp.fc1", "mlp.fc2")


@dataclasses.dataclass(frozen=True)
class TowerTable:
    """The rules of one tower pairing and the folds around them.

    `export_ours` rewrites our flat tensors before the rules; `export_extra` gives Hugging
    Face tensors with no counterpart in ours; `import_theirs` rewrites theirs before the
    rules (it may add tensors that the rules then map).
    """

    kind: str
    rules: tuple[Rule, ...]
    export_ours: Callable[[Tensors], Tensors] = lambda t: t
    export_extra: Callable[[Tensors], Tensors] = lambda t: {}
    import_theirs: Callable[[Tensors], Tensors] = lambda t: t


def _fold_patch_bias(ours: Tensors) -> Tensors:
    """CLIP has no patch-embedding bias: conv(x) + b + pos == conv(x) + (pos + b)."""
    ours = dict(ours)
    bias = ours.pop("patch_embed/bias")
    pos = np.array(ours["pos_embed"], copy=True)
    pos[:, 1:] += bias  # Position 0 is the class token, which no conv produced.
    ours["pos_embed"] = pos
    return ours


def _zero_patch_bias(theirs: Tensors) -> Tensors:
    weight = theirs.get("embeddings.patch_embedding.weight")
    if weight is None:
        return theirs
    return {**theirs, "embeddings.patch_embedding.bias": np.zeros(weight.shape[0], weight.dtype)}


CLIP_VISION = TowerTable(
    "clip_vision",
    tuple(
        [
            Rule("patch_embed/kernel", "embeddings.patch_embedding.weight", CONV),
            Rule("patch_embed/bias", "embeddings.patch_embedding.bias"),  # Folded, see above.
            Rule("cls", "embeddings.class_embedding", FLATTEN),
            Rule("pos_embed", "embeddings.position_embedding.weight", DROP_LEAD),
        ]
        + _norm("pre_norm", "pre_layrnorm")
        + _clip_blocks()
        + _norm("encoder/final_norm", "post_layernorm")
    ),
    export_ours=_fold_patch_bias,
    import_theirs=_zero_patch_bias,
)

SIGLIP_VISION = TowerTable(
    "siglip_vision",
    tuple(
        _dense("patch_embed", "embeddings.patch_embedding", CONV)
        + [Rule("pos_embed", "embeddings.position_embedding.weight", DROP_LEAD)]
        + _clip_blocks()
        + _norm("encoder/final_norm", "post_layernorm")
        + [Rule("map_head/probe", "head.probe")]
        + _attention(
            "map_head/attn",
            "head.attention.in_proj#0",
            "head.attention.in_proj#1",
            "head.attention.in_proj#2",
            "head.attention.out_proj",
        )
        + _norm("map_head/norm", "head.layernorm")
        + _dense("map_head/mlp/fc1", "head.mlp.fc1")
        + _dense("map_head/mlp/fc2", "head.mlp.fc2")
    ),
)


def _identity_pooler(ours: Tensors) -> Tensors:
    """ViTModel's pooler is dense + activation; exported as identity + `linear`."""
    width = ours["pos_embed"].shape[-1]
    dtype = ours["pos_embed"].dtype
    return {
        "pooler.dense.weight": np.eye(width, dtype=dtype),
        "pooler.dense.bias": np.zeros(width, dtype),
    }


def _drop(pattern: str) -> Callable[[Tensors], Tensors]:
    regex = re.compile(pattern)
    return lambda theirs: {k: v for k, v in theirs.items() if not regex.match(k)}


VIT = TowerTable(
    "vit",
    tuple(
        _dense("patch_embed", "embeddings.patch_embeddings.projection", CONV)
        + [
            Rule("cls", "embeddings.cls_token"),
            Rule("pos_embed", "embeddings.position_embeddings"),
        ]
        # The names ViT checkpoints have on disk (transformers 5 renames them when loading).
        + _blocks(
            "encoder.layer.{i}.",
            "layernorm_before",
            (
                "attention.attention.query",
                "attention.attention.key",
                "attention.attention.value",
                "attention.output.dense",
            ),
            "layernorm_after",
            "intermediate.dense",
            "output.dense",
        )
        + _norm("encoder/final_norm", "layernorm")
    ),
    export_extra=_identity_pooler,
    # A pretrained ViT's pooler (dense + tanh) is not part of our tower.
    import_theirs=_drop(r"pooler\."),
)

_TEXT_EMBED = [
    Rule("token_embed/embedding", "embeddings.token_embedding.weight"),
    Rule("pos_embed", "embeddings.position_embedding.weight"),
]

CLIP_TEXT = TowerTable(
    "clip_text",
    tuple(_TEXT_EMBED + _clip_blocks() + _norm("encoder/final_norm", "final_layer_norm")),
)

# SigLIP's text head (a dense layer) is our text projection: a model part, not the tower's.
SIGLIP_TEXT = dataclasses.replace(CLIP_TEXT, kind="siglip_text", import_theirs=_drop(r"head\."))


def _zero_token_types(ours: Tensors) -> Tensors:
    pos = ours["pos_embed"]
    return {"embeddings.token_type_embeddings.weight": np.zeros((1, pos.shape[-1]), pos.dtype)}


def _fold_token_types(theirs: Tensors) -> Tensors:
    """BERT adds token-type row 0 to every position (one segment): fold it into them."""
    theirs = dict(theirs)
    types = theirs.pop("embeddings.token_type_embeddings.weight", None)
    if types is not None and "embeddings.position_embeddings.weight" in theirs:
        theirs["embeddings.position_embeddings.weight"] = (
            theirs["embeddings.position_embeddings.weight"] + types[0]
        )
    return theirs


BERT = TowerTable(
    "bert",
    tuple(
        [
            Rule("token_embed/embedding", "embeddings.word_embeddings.weight"),
            Rule("pos_embed", "embeddings.position_embeddings.weight"),
        ]
        + _norm("embed_norm", "embeddings.LayerNorm")
        + _blocks(
            "encoder.layer.{i}.",
            "attention.output.LayerNorm",
            (
                "attention.self.query",
                "attention.self.key",
                "attention.self.value",
                "attention.output.dense",
            ),
            "output.LayerNorm",
            "intermediate.dense",
            "output.dense",
        )
        + _dense("pooler", "pooler.dense")
    ),
    export_extra=_zero_token_types,
    import_theirs=_fold_token_types,
)

TOWERS: Mapping[str, TowerTable] = {
    t.kind: t for t in (CLIP_VISION, SIGLIP_VISION, VIT, CLIP_TEXT, SIGLIP_TEXT, BERT)
}
