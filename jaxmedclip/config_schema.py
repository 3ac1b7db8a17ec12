"""Every config field the code reads, declared once per section: a key that is not
declared is an error naming it and the valid keys there, wherever it comes from (the
experiment file or a `--config.a.b=value` override).

`FIELDS` is a tree: a name maps to None (a field) or to a dict (a group of fields, which
may itself be None: an optional group switched off, e.g. `loss.local`). `eval` is
checked by `evaluation.eval_config` against its own declared defaults (its prompt
tables are keyed by finding). Defaults and types still live with the code that reads
each section (`LossSpec`, `AugmentConfig`, ...); tests check that those declarations and
this one name the same fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_ = None  # A field (as opposed to a group).

AUGMENT = dict.fromkeys(("crop_scale", "crop_aspect", "rotation_degrees", "brightness",
                         "contrast", "gamma", "horizontal_flip"))
DECOUPLED = dict.fromkeys(("label_prompt_fraction", "text_only_fraction",
                           "label_only_prompts"))
SYNTHETIC = dict.fromkeys(("num_train", "num_validation", "num_test", "source_image_size",
                           "seed"))
LOSS = dict.fromkeys(("name", "impl", "targets", "multi_positive_key",
                      "soft_target_temperature", "label_smoothing", "i2t_weight",
                      "t2i_weight", "tile_size", "matmul_inputs"))
LOCAL = dict.fromkeys(("weight", "max_words", "t1", "t2", "t3", "impl", "i2t_weight",
                       "t2i_weight"))
MULTIVIEW = dict.fromkeys(("image_text_weight", "image_image_weight", "text_text_weight",
                           "image_text_reduction"))
TOWER = dict.fromkeys(("name", "width", "depth", "num_heads", "mlp_ratio", "pool"))

FIELDS: dict[str, Any] = {
    **dict.fromkeys(("seed", "total_steps", "global_batch_size", "log_every",
                     "checkpoint_every", "checkpoint_keep", "checkpoint_best_metric",
                     "checkpoint_best_mode", "checkpoint_keep_best", "microbatch_size",
                     "logical_axis_rules")),
    "mesh": dict.fromkeys(("data", "fsdp", "tensor")),
    "init_from": dict.fromkeys(("path", "towers")),
    "data": {
        **dict.fromkeys((
            "name", "data_dir", "manual_dir", "reports_dir", "manifest", "split_fractions",
            "split_seed", "views", "source_max_size", "max_bad_fraction",
            "build_max_bad_fraction", "build_workers", "image_size", "image_mean",
            "image_std", "text", "max_sentences", "num_sentences", "sentence_fraction",
            "full_report_prob", "max_text_len", "vocab_size", "tokenizer_type", "multiview",
            "multiview_texts")),
        "augment": AUGMENT,
        "decoupled": DECOUPLED,
        "synthetic": SYNTHETIC,
    },
    "model": {
        **dict.fromkeys(("name", "embed_dim", "dtype", "param_dtype", "remat",
                         "scan_layers", "attention_impl", "temperature_init", "max_scale",
                         "bias_init", "image_projection", "local_dim")),
        "image": {**TOWER, **dict.fromkeys(("patch_size", "num_channels", "pre_norm"))},
        "text": {**TOWER, **dict.fromkeys(("variant", "layout"))},
    },
    "loss": {**LOSS, "local": LOCAL, "multiview": MULTIVIEW},
    "optim": dict.fromkeys((
        "name", "learning_rate", "base_batch_size", "schedule", "warmup_steps",
        "cooldown_steps", "rsqrt_timescale", "b1", "b2", "eps", "weight_decay",
        "decay_embeddings", "grad_clip_norm", "layer_decay", "frozen", "image_lr_mult",
        "text_lr_mult")),
    "eval": "checked by evaluation.eval_config",
}


def unknown_fields(config: Mapping[str, Any], fields: Mapping[str, Any] = FIELDS,
                   path: str = "") -> list[str]:
    """One message per key of `config` that `fields` does not declare (recursively)."""
    problems = []
    for key, value in config.items():
        where = f"{path}{key}"
        if key not in fields:
            here = path[:-1] or "the top level"
            problems.append(f"{where} is not a config field; {here} has "
                            f"{', '.join(sorted(fields))}")
            continue
        declared = fields[key]
        if isinstance(declared, dict):
            if value is None:
                continue  # An optional group that is off.
            if not hasattr(value, "items"):  # A dict or a ConfigDict.
                problems.append(f"{where} is a group of fields ({', '.join(sorted(declared))}),"
                                f" not {value!r}")
                continue
            problems += unknown_fields(value, declared, where + ".")
    return problems


def check_fields(config: Mapping[str, Any]) -> None:
    """Raises a ValueError listing every undeclared key of `config` (and `eval`'s)."""
    from jaxmedclip import evaluation  # Its declared defaults are the eval schema.

    problems = unknown_fields(config)
    if problems:
        raise ValueError("unknown config fields:\n  " + "\n  ".join(problems))
    evaluation.eval_config(config)
