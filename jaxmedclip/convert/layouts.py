"""Whole-model layouts: which tower table sits under which Hugging Face prefix, and the
rules of the parts between the towers (projections, temperature, bias)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np

from jaxmedclip.convert import rules as rules_lib
from jaxmedclip.convert import towers
from jaxmedclip.convert.rules import DENSE, SAME, SCALAR_1, Rule

OUR_TOWERS = {"image": "image_tower", "text": "text_tower"}


@dataclasses.dataclass(frozen=True)
class Layout:
    """`towers`: (image|text, table, Hugging Face prefix); `heads`: rules on the top-level
    params; `head_extra`: Hugging Face tensors with no counterpart in ours."""

    towers: tuple[tuple[str, towers.TowerTable, str], ...]
    heads: tuple[Rule, ...] = ()
    head_extra: Callable[[Mapping[str, np.ndarray]], dict] = lambda flat: {}

    def tower(self, which: str) -> tuple[towers.TowerTable, str]:
        for name, table, prefix in self.towers:
            if name == which:
                return table, prefix
        raise KeyError(which)


def _siglip_head_bias(flat: Mapping[str, np.ndarray]) -> dict:
    kernel = flat["text_proj/kernel"]  # Our projection has no bias; SigLIP's head has one.
    return {"text_model.head.bias": np.zeros(kernel.shape[-1], kernel.dtype)}


CLIP = Layout(
    towers=(
        ("image", towers.CLIP_VISION, "vision_model."),
        ("text", towers.CLIP_TEXT, "text_model."),
    ),
    heads=(
        Rule("image_proj/kernel", "visual_projection.weight", DENSE),
        Rule("text_proj/kernel", "text_projection.weight", DENSE),
        Rule("log_scale", "logit_scale", SAME),
    ),
)

SIGLIP = Layout(
    towers=(
        ("image", towers.SIGLIP_VISION, "vision_model."),
        ("text", towers.SIGLIP_TEXT, "text_model."),
    ),
    heads=(
        Rule("text_proj/kernel", "text_model.head.weight", DENSE),
        Rule("log_scale", "logit_scale", SCALAR_1),
        Rule("bias", "logit_bias", SCALAR_1),
    ),
    head_extra=_siglip_head_bias,
)

# Where VisionTextDualEncoderModel keeps each vision model's tensors (transformers 5).
DUAL_VISION_PREFIX = {
    "clip_vision": "vision_model.",
    "siglip_vision": "vision_model.",
    "vit": "vision_model.",
}


def dual_encoder(vision: towers.TowerTable) -> Layout:
    return Layout(
        towers=(
            ("image", vision, DUAL_VISION_PREFIX[vision.kind]),
            ("text", towers.BERT, "text_model."),
        ),
        heads=(
            Rule("image_proj/kernel", "visual_projection.weight", DENSE),
            Rule("text_proj/kernel", "text_projection.weight", DENSE),
            Rule("log_scale", "logit_scale", SAME),
        ),
    )


def to_hf(params: Mapping, layout: Layout) -> dict[str, np.ndarray]:
    """Our (nested, possibly scanned) params -> one Hugging Face state dict."""
    flat = rules_lib.unstack_layers(
        {k: np.asarray(v) for k, v in rules_lib.flatten(params).items()}
    )
    out: dict[str, np.ndarray] = {}
    used: set[str] = set()
    for which, table, prefix in layout.towers:
        root = OUR_TOWERS[which] + "/"
        ours = {k[len(root) :]: v for k, v in flat.items() if k.startswith(root)}
        used.update(root + k for k in ours)
        ours = table.export_ours(ours)
        converted = rules_lib.to_hf(ours, list(table.rules))
        converted.update(table.export_extra(ours))
        out.update({prefix + k: v for k, v in converted.items()})
    heads = {k: v for k, v in flat.items() if k not in used}
    head_names = {r.ours for r in layout.heads}
    out.update(
        rules_lib.to_hf({k: v for k, v in heads.items() if k in head_names}, list(layout.heads))
    )
    out.update(layout.head_extra(flat))
    return out
