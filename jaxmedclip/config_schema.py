"""Every config field the code reads, declared once: its default, its type and, for a
choice, its allowed values.

`complete(config)` is the one validation of a loaded config (`config_lib` calls it, and
so do `train()`, evaluate and export for configs built in code or read from a
checkpoint): every section gets its declared fields filled in, so the rest of the code
reads `config.loss.tile_size` without a fallback; a key that is not declared, a value of
the wrong type or outside its choices is an error naming the field and what would be
valid. Filling happens before `--config.a.b=value` overrides, so any declared field can
be overridden, not only those an experiment file writes.

The tree `FIELDS` maps a name to a `Field`, to a dict (a group of fields) or to an
`Optional` group: off when None (e.g. `loss.local`), else completed like a group.
Semantic checks between fields of one section stay with the typed object that reads the
section (`LossSpec`, `AugmentConfig`, `MultiviewSpec`, `DecoupledData`, ...); checks
across sections are in `training.setup.check_config`. `eval` is declared by
`evaluation.default_config()` (prompt tables keyed by finding) and checked by
`evaluation.eval_config`.

This module imports nothing from the project: both packages import it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections

REQUIRED = object()  # A field without a default: every experiment must set it.


@dataclasses.dataclass(frozen=True)
class Field:
    default: Any = REQUIRED
    types: tuple[type, ...] = ()  # Accepted Python types; () takes the default's type.
    choices: tuple | None = None
    nullable: bool = False  # None accepted (implied by a None default).

    def accepts(self) -> tuple[type, ...]:
        if self.types:
            return self.types
        if self.default is REQUIRED or self.default is None:
            return ()
        return (type(self.default),)


@dataclasses.dataclass(frozen=True)
class Optional:
    """A group that is off when the config holds None (or leaves it out)."""

    fields: dict


def _f(default=REQUIRED, *types, choices=None, nullable=False) -> Field:
    return Field(default, tuple(types), None if choices is None else tuple(choices), nullable)


INT, FLOAT, STR = int, float, str
SEQ = (tuple, list)

# Allowed values, imported by the code that acts on them.
LOSSES = ("softmax", "sigmoid")
LOSS_IMPLS = ("dense", "all_gather", "ring")
TARGETS = ("one_hot", "multi_positive", "soft_labels")
MULTI_POSITIVE_KEYS = ("study_id", "text_id", "no_finding")
MATMUL_INPUTS = ("float32", "bfloat16")
REDUCTIONS = ("mean", "sum")
TEXT_SOURCES = ("report", "both", "findings", "impression", "sentences")
MULTIVIEW_TEXTS = ("resample", "findings_impression")
TOKENIZER_TYPES = ("unigram", "bpe", "char", "word")
DEID_MODES = ("drop", "token")  # input_pipeline.reports.DEID_MODES
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = (None, "xla", "cudnn")
# What a rematerialised block saves for the backward pass (models/layers.REMAT_POLICIES);
# "none": no rematerialisation.
REMAT_POLICIES = ("none", "full", "save_dots", "save_attention", "save_dots_and_attention")
PATCH_EMBEDS = ("dense", "conv")
IMAGE_DTYPES = ("float32", "uint16", "uint8")
IMAGE_POOLS = ("cls", "mean", "map")
# Where the image side of the local alignment (`model.local_dim`) reads its region
# features: the tower's last-layer patch tokens, or a shallow convolutional head of its own.
LOCAL_SOURCES = ("tokens", "patches")
# What the text side of the local alignment reads: the words of the text (sub-word pieces
# merged; GLoRIA), or the text tower's pooled feature, one "word" per text (the regions are
# then pooled by their attention to the whole text, as PACL does).
LOCAL_TEXTS = ("words", "sentence")
LOCAL_HEAD_STEMS = ("window", "conv")
TEXT_VARIANTS = ("causal", "bidirectional")
TEXT_POOLS = (None, "eos", "first", "last")  # None: the variant's own.
TEXT_LAYOUTS = ("pre_ln", "bert")
SCHEDULES = ("cosine", "linear", "rsqrt", "constant")
OPTIMIZERS = ("adamw", "lamb")
TOWERS = ("image", "text")

AUGMENT = dict(
    crop_scale=_f(None, *SEQ),  # None: no crop.
    crop_aspect=_f((3 / 4, 4 / 3), *SEQ),
    rotation_degrees=_f(0.0, FLOAT),
    brightness=_f(0.0, FLOAT),
    contrast=_f(0.0, FLOAT),
    gamma=_f(0.0, FLOAT),
    horizontal_flip=_f(False),
)
DECOUPLED = dict(
    label_prompt_fraction=_f(0.0, FLOAT),
    text_only_fraction=_f(0.0, FLOAT),
    label_only_prompts=_f(True),
)
SYNTHETIC = dict(
    num_train=_f(4096), num_validation=_f(512), num_test=_f(1024),
    source_image_size=_f(128), seed=_f(0),
)
LOSS = dict(
    name=_f("softmax", choices=LOSSES),
    impl=_f("all_gather", choices=LOSS_IMPLS),
    targets=_f("one_hot", choices=TARGETS),
    # Names from MULTI_POSITIVE_KEYS, as a tuple or "a,b" (LossSpec checks them).
    multi_positive_key=_f(("study_id",), STR, *SEQ),
    soft_target_temperature=_f(0.1, FLOAT),
    label_smoothing=_f(0.0, FLOAT),
    i2t_weight=_f(0.5, FLOAT),
    t2i_weight=_f(0.5, FLOAT),
    tile_size=_f(0, INT, nullable=True),  # In-device tiles of the ring loss; 0/None: untiled.
    matmul_inputs=_f("float32", choices=MATMUL_INPUTS),
)
LOCAL = dict(
    weight=_f(1.0, FLOAT),
    max_words=_f(None, INT),  # None: the text length.
    t1=_f(4.0, FLOAT), t2=_f(5.0, FLOAT), t3=_f(10.0, FLOAT),
    impl=_f(None, STR, choices=(None, *LOSS_IMPLS)),  # None: loss.impl.
    i2t_weight=_f(0.5, FLOAT), t2i_weight=_f(0.5, FLOAT),
)
MULTIVIEW = dict(
    image_text_weight=_f(1.0, FLOAT),
    image_image_weight=_f(1.0, FLOAT),
    text_text_weight=_f(1.0, FLOAT),
    image_text_reduction=_f("mean", choices=REDUCTIONS),
)


def _tower(**extra) -> dict:
    return dict(width=_f(REQUIRED, INT), depth=_f(REQUIRED, INT),
                num_heads=_f(REQUIRED, INT), mlp_ratio=_f(4.0, FLOAT), **extra)


FIELDS: dict[str, Any] = dict(
    seed=_f(0),
    total_steps=_f(REQUIRED, INT),
    global_batch_size=_f(REQUIRED, INT),
    log_every=_f(10),
    checkpoint_every=_f(0),  # 0: only at the end (and at evaluations that rank).
    checkpoint_keep=_f(3),
    checkpoint_best_metric=_f(None, STR),
    checkpoint_best_mode=_f("max", choices=("max", "min")),
    checkpoint_keep_best=_f(1),
    microbatch_size=_f(None, INT),  # GradCache micro-batch; None: the whole batch at once.
    # GradCache with the micro-batches copied from host memory one at a time: the batch
    # needs no device memory (training/stream.py). Needs microbatch_size.
    stream_microbatches=_f(False),
    logical_axis_rules=_f(None, *SEQ),  # None: parallel.DEFAULT_RULES.
    mesh=dict(data=_f(-1), fsdp=_f(1), tensor=_f(1)),
    init_from=Optional(dict(path=_f(None, STR), towers=_f(TOWERS, *SEQ))),
    data=dict(
        name=_f(REQUIRED, STR),
        data_dir=_f(None, STR),  # None: $JAXMEDCLIP_DATA_DIR or ~/.cache/jaxmedclip/tfds.
        manual_dir=_f(None, STR),
        reports_dir=_f(None, STR),
        manifest=_f(None, STR),
        split_fractions=_f(None, *SEQ),
        split_seed=_f(0),
        views=_f(None, *SEQ),
        source_max_size=_f(None, INT),
        max_bad_fraction=_f(0.05, FLOAT),
        build_max_bad_fraction=_f(None, FLOAT),
        build_workers=_f(None, INT),
        # De-identification placeholders in reports (input_pipeline/reports.py): "drop"
        # removes them, "token" writes one placeholder token; deid_pattern: an extra regex.
        deid=_f("drop", choices=DEID_MODES),
        deid_pattern=_f(None, STR),
        image_size=_f(REQUIRED, INT),
        image_mean=_f(0.5, FLOAT),
        image_std=_f(0.25, FLOAT),
        # The type images cross to the devices in: float32, normalised on the host; or
        # uint16 / uint8, [0, 1] intensities scaled to the type's range and normalised on
        # the device (2x / 4x fewer bytes; uint16 keeps 16-bit sources' precision).
        image_dtype=_f("float32", choices=IMAGE_DTYPES),
        text=_f("report", choices=TEXT_SOURCES),
        max_sentences=_f(None, INT),
        num_sentences=_f(None, INT),
        sentence_fraction=_f(None, FLOAT),
        full_report_prob=_f(0.0, FLOAT),
        max_text_len=_f(REQUIRED, INT),
        vocab_size=_f(REQUIRED, INT),
        tokenizer_type=_f("unigram", choices=TOKENIZER_TYPES),
        multiview=_f(False),
        multiview_texts=_f("resample", choices=MULTIVIEW_TEXTS),
        augment=Optional(AUGMENT),
        decoupled=Optional(DECOUPLED),
        synthetic=dict(SYNTHETIC),
    ),
    model=dict(
        name=_f("two_tower", choices=("two_tower",)),
        embed_dim=_f(REQUIRED, INT),
        dtype=_f("float32", choices=DTYPES),
        param_dtype=_f("float32", choices=DTYPES),
        remat=_f(False),
        # What rematerialised blocks save; None: `remat` decides ("full" or "none").
        remat_policy=_f(None, STR, choices=REMAT_POLICIES),
        scan_layers=_f(False),
        scan_unroll=_f(1),  # Blocks per iteration of the scanned loop (scan_layers).
        attention_impl=_f(None, STR, choices=ATTENTION_IMPLS),
        # Sequence lengths are padded to a multiple of this inside attention (the true
        # lengths passed to the kernel); None: 2 with cudnn (it refuses odd lengths in
        # training), else 1.
        attention_pad_multiple=_f(None, INT),
        temperature_init=_f(1 / 0.07, FLOAT),
        max_scale=_f(100.0, FLOAT),
        bias_init=_f(-10.0, FLOAT),
        image_projection=_f(True),
        local_dim=_f(None, INT),  # The GLoRIA local projection; None: off.
        # The region features the local projection reads (LOCAL_SOURCES): "tokens", the
        # image tower's last-layer patch tokens; "patches", a head of its own over the patch
        # grid (`vit.LocalPatchHead`: its own window embedding and positions, then per
        # kernel of `local_head_kernels` a branch of `local_head_depth` residual
        # convolutions), whose receptive field is bounded (1 + depth * (kernel - 1)
        # windows a side) so that a region's feature describes that region: what
        # grounding maps need.
        local_source=_f("tokens", choices=LOCAL_SOURCES),
        local_text=_f("words", choices=LOCAL_TEXTS),
        local_head_width=_f(None, INT),  # None: model.image.width.
        # The head's windows (model.image.patch_size wide) start every `local_head_stride`
        # pixels (None: the patch size, no overlap); a smaller stride gives finer maps.
        local_head_stride=_f(None, INT),
        local_head_depth=_f(1),
        # One branch of the head per kernel size (features at several scales per window).
        local_head_kernels=_f((1,), *SEQ),
        # How the head describes a window (LOCAL_HEAD_STEMS): "window", one linear
        # embedding of its patch_size x patch_size pixels; "conv", a small CNN (3 x 3
        # convolutions down to the stride, a power of two; windows 1 + 2 * stride wide).
        local_head_stem=_f("window", choices=LOCAL_HEAD_STEMS),
        # The local features read the towers' outputs through stop_gradient: the local
        # loss trains the local head and projections, never the towers.
        local_stop_gradient=_f(False),
        image=_tower(name=_f("vit", choices=("vit",)), patch_size=_f(REQUIRED, INT),
                     pool=_f("cls", choices=IMAGE_POOLS), num_channels=_f(1),
                     pre_norm=_f(False), patch_embed=_f("dense", choices=PATCH_EMBEDS)),
        text=_tower(name=_f("transformer", choices=("transformer",)),
                    variant=_f("causal", choices=TEXT_VARIANTS),
                    pool=_f(None, STR, choices=TEXT_POOLS),
                    layout=_f("pre_ln", choices=TEXT_LAYOUTS)),
    ),
    loss=dict(**LOSS, local=Optional(LOCAL), multiview=Optional(MULTIVIEW)),
    optim=dict(
        name=_f("adamw", choices=OPTIMIZERS),
        learning_rate=_f(REQUIRED, FLOAT),
        base_batch_size=_f(None, INT),  # Linear LR scaling from this batch; None: off.
        schedule=_f("cosine", choices=SCHEDULES),
        warmup_steps=_f(0),
        cooldown_steps=_f(0),
        rsqrt_timescale=_f(None, FLOAT),  # None: warmup_steps (or 10,000).
        b1=_f(0.9, FLOAT), b2=_f(0.999, FLOAT), eps=_f(1e-8, FLOAT),
        weight_decay=_f(0.0, FLOAT),
        decay_embeddings=_f(True),
        grad_clip_norm=_f(None, FLOAT),  # None or 0: no clipping.
        layer_decay=_f(None, FLOAT),
        frozen=_f((), STR, *SEQ),  # Path prefixes: names, tuples of names or "a,b/c".
        image_lr_mult=_f(1.0, FLOAT),
        text_lr_mult=_f(1.0, FLOAT),
    ),
    # evaluation.default_config() declares it; complete() merges it over those defaults.
    eval=Field(None, (Mapping,), nullable=True),
)


# Renamed fields: the old key is refused with a message naming the new one.
RENAMED = {
    "data.decoupled.image_only_fraction": (
        "label_prompt_fraction (the rows whose text is replaced by their labels written as "
        "a prompt; their image stays)"),
}


def _type_name(types: tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in types)


def _value(field: Field, value: Any, where: str) -> Any:
    """`value` checked (and normalised: int -> float, list -> tuple) against `field`."""
    if value is None:
        if field.nullable or field.default is None or (
                field.choices is not None and None in field.choices):
            return None
        raise ValueError(f"{where} is None; it needs a value"
                         + (f" (default {field.default!r})" if field.default is not REQUIRED
                            else ""))
    types = field.accepts()
    if types:
        if float in types and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in types:
            ok = False
        else:
            ok = isinstance(value, types) or (int in types and _is_int(value))
        if not ok:
            raise ValueError(f"{where}={value!r} must be {_type_name(types)}, not "
                             f"{type(value).__name__}")
        if isinstance(value, list):
            value = tuple(value)
        if int in types and _is_int(value) and not isinstance(value, int):
            value = int(value)
    if field.choices is not None and value not in field.choices:
        raise ValueError(f"{where}={value!r} is unknown; choose one of "
                         f"{[c for c in field.choices]}")
    return value


def _is_int(value: Any) -> bool:
    return hasattr(value, "__index__") and not isinstance(value, bool)


def _group(fields: Mapping[str, Any], values: Mapping[str, Any] | None, path: str,
           problems: list[str], required: bool = True) -> dict:
    values = {} if values is None else values
    out = {}
    for key in values:
        if f"{path}{key}" in RENAMED:
            problems.append(f"{path}{key} is now called {RENAMED[path + key]}: rename the key")
        elif key not in fields:
            here = path[:-1] or "the top level"
            problems.append(f"{path}{key} is not a config field; {here} has "
                            f"{', '.join(sorted(fields))}")
    for key, declared in fields.items():
        where = f"{path}{key}"
        present = key in values
        value = values[key] if present else None
        if isinstance(declared, Optional):
            if value is None:
                out[key] = None
                continue
            declared = declared.fields
        if isinstance(declared, dict):
            if present and value is not None and not hasattr(value, "items"):
                problems.append(f"{where} is a group of fields "
                                f"({', '.join(sorted(declared))}), not {value!r}")
                continue
            out[key] = _group(declared, value, where + ".", problems, required)
            continue
        if not present:
            if declared.default is REQUIRED:
                if required:
                    problems.append(f"{where} is required (no default)")
                continue
            out[key] = declared.default
            continue
        if key == "eval" and not path:
            out[key] = value  # evaluation.eval_config checks it.
            continue
        try:
            out[key] = _value(declared, value, where)
        except ValueError as e:
            problems.append(str(e))
    return out


def section(path: str) -> Any:
    """The declaration at dotted `path`, e.g. "loss" or "loss.local" (a dict of fields);
    "" is the top level."""
    node: Any = FIELDS
    for part in filter(None, path.split(".")):
        node = node[part]
        if isinstance(node, Optional):
            node = node.fields
    return node


def defaults(path: str) -> dict[str, Any]:
    """{field: default} of the group at `path` (fields without a default left out)."""
    return {k: v.default for k, v in section(path).items()
            if isinstance(v, Field) and v.default is not REQUIRED}


def complete_section(path: str, values: Mapping[str, Any] | None) -> dict[str, Any]:
    """The group at `path` of a config, checked, with every field that has a default
    filled in (a plain dict). For the code that reads one section (a builder, the loss):
    fields without a default are left out when absent; `complete` requires them."""
    if hasattr(values, "to_dict"):
        values = values.to_dict()
    problems: list[str] = []
    out = _group(section(path), values, f"{path}." if path else "", problems, required=False)
    _raise(problems)
    return out


def filled(path: str, values: Mapping[str, Any] | None) -> ml_collections.ConfigDict:
    """`complete_section` as a ConfigDict (attribute access, as the readers use)."""
    return ml_collections.ConfigDict(complete_section(path, values), type_safe=False)


def _raise(problems: list[str]) -> None:
    if problems:
        raise ValueError("invalid config:\n  " + "\n  ".join(problems))


def complete(config: Mapping[str, Any], *, required: bool = True
             ) -> ml_collections.ConfigDict:
    """`config` checked against `FIELDS` with every declared field filled in (a new
    ConfigDict; `config` is not changed). Idempotent. `required=False` accepts a config
    that leaves out fields without a default (an experiment file loaded to be edited, or
    a data-only config for building shards)."""
    from jaxmedclip import evaluation  # Its declared defaults are the eval schema.

    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    problems: list[str] = []
    out = _group(FIELDS, values, "", problems, required)
    _raise(problems)
    completed = ml_collections.ConfigDict(out, type_safe=False)
    completed.eval = evaluation.eval_config(completed)
    return completed
