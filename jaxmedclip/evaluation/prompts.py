"""Zero-shot prompts: templates, per-finding phrases, and the prompt sets they expand to.

A finding's positive prompts are every positive template filled with every phrase of the
finding (e.g. "there is pleural effusion"); its negative prompts likewise ("no pleural
effusion"). Either side of a finding may instead be listed in full
(`eval.prompts.positive.<slug>`, `eval.prompts.negative.<slug>`): "No Finding" needs it,
and so do findings whose absence reports phrase differently ("heart size is normal.").
Configs key findings by slug ("Pleural Effusion" -> "pleural_effusion") so that
`--config.eval.prompts...` works.
"""

from __future__ import annotations

from typing import NamedTuple

import ml_collections

# Sentences end with a period, as every sentence of a report does (a prompt without one is
# out of the training distribution).
POSITIVE_TEMPLATES = ("{finding}.", "there is {finding}.", "findings consistent with {finding}.")
NEGATIVE_TEMPLATES = ("no {finding}.", "no evidence of {finding}.")

# Phrases for all CheXpert findings; the first one is the plain name.
FINDING_PHRASES: dict[str, tuple[str, ...]] = {
    "Enlarged Cardiomediastinum": ("enlarged cardiomediastinum", "widened mediastinum"),
    "Cardiomegaly": ("cardiomegaly", "an enlarged heart"),
    "Lung Opacity": ("lung opacity", "airspace opacity"),
    "Lung Lesion": ("lung lesion", "pulmonary nodule"),
    "Edema": ("pulmonary edema", "edema"),
    "Consolidation": ("consolidation", "focal consolidation"),
    "Pneumonia": ("pneumonia",),
    "Atelectasis": ("atelectasis",),
    "Pneumothorax": ("pneumothorax",),
    "Pleural Effusion": ("pleural effusion",),
    "Pleural Other": ("pleural thickening",),
    "Fracture": ("fracture", "rib fracture"),
    "Support Devices": ("support devices", "lines and tubes"),
}

# Written-out prompts replace the template expansion of one side of a finding, where
# reports do not say "no <finding>": "No Finding" fits neither template, and radiologists
# write "heart size is normal", not "no cardiomegaly".
FULL_POSITIVE: dict[str, tuple[str, ...]] = {
    "No Finding": (
        "no acute cardiopulmonary process.", "the lungs are clear.", "normal chest radiograph."
    ),
}
FULL_NEGATIVE: dict[str, tuple[str, ...]] = {
    "No Finding": ("acute cardiopulmonary process.", "abnormal chest radiograph."),
    "Cardiomegaly": (
        "heart size is normal.",
        "the heart is not enlarged.",
        "the cardiac silhouette is normal in size.",
    ),
    "Enlarged Cardiomediastinum": (
        "the mediastinal contours are normal.",
        "the cardiomediastinal silhouette is within normal limits.",
    ),
    "Lung Opacity": ("the lungs are clear.", "no focal opacity."),
}


class PromptSet(NamedTuple):
    """The positive and the negative prompts of one finding."""

    positive: tuple[str, ...]
    negative: tuple[str, ...]


def slug(finding: str) -> str:
    """Config key of a finding: "Pleural Effusion" -> "pleural_effusion"."""
    return finding.strip().lower().replace(" ", "_").replace("-", "_")


def default_prompt_config() -> ml_collections.ConfigDict:
    """The `eval.prompts` section: templates, phrases and full prompt lists by slug."""
    return ml_collections.ConfigDict(
        dict(
            positive_templates=POSITIVE_TEMPLATES,
            negative_templates=NEGATIVE_TEMPLATES,
            phrases={slug(name): phrases for name, phrases in FINDING_PHRASES.items()},
            positive={slug(name): prompts for name, prompts in FULL_POSITIVE.items()},
            negative={slug(name): prompts for name, prompts in FULL_NEGATIVE.items()},
        )
    )


def _unique(items) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def _fill(templates, phrases) -> tuple[str, ...]:
    try:
        return _unique(t.format(finding=p) for t in templates for p in phrases)
    except (KeyError, IndexError) as e:
        raise ValueError(
            f"prompt templates {tuple(templates)} may only use the field {{finding}}: {e}"
        ) from None


def prompt_set(finding: str, prompt_config: ml_collections.ConfigDict | None = None) -> PromptSet:
    """The prompts of `finding` under `prompt_config` (an `eval.prompts` section)."""
    cfg = default_prompt_config() if prompt_config is None else prompt_config
    key = slug(finding)
    phrases = cfg.get("phrases", {}).get(key) or (finding.lower(),)
    if isinstance(phrases, str):
        phrases = (phrases,)
    full_positive = cfg.get("positive", {}).get(key)
    full_negative = cfg.get("negative", {}).get(key)
    positive = (
        _unique(full_positive)
        if full_positive
        else _fill(cfg.get("positive_templates", POSITIVE_TEMPLATES), phrases)
    )
    negative = (
        _unique(full_negative)
        if full_negative
        else _fill(cfg.get("negative_templates", NEGATIVE_TEMPLATES), phrases)
    )
    if not positive or not negative:
        raise ValueError(f"finding {finding!r} has no positive or no negative prompts")
    return PromptSet(positive, negative)


def prompt_sets(
    findings, prompt_config: ml_collections.ConfigDict | None = None
) -> dict[str, PromptSet]:
    return {finding: prompt_set(finding, prompt_config) for finding in findings}
