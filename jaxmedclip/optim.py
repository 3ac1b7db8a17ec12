"""Optimizers and learning-rate schedules (optax) built from `config.optim`.

Everything is one optax chain: the step is a pure function of (updates, state, params),
so it jits with sharded parameters and the optimizer count is the training step.

Config (`config.optim`; new fields are read with defaults, so older configs keep working):
  name: "adamw" | "lamb" (LAMB: Adam with a per-tensor trust ratio, for large batches).
  learning_rate: the peak learning rate (after warmup) at `base_batch_size`.
  base_batch_size: None (default) or B0: the peak learning rate becomes
    learning_rate * global_batch_size / B0 (the linear scaling rule of Goyal et al.).
  schedule: "cosine" | "linear" | "rsqrt" | "constant", after `warmup_steps` of linear
    warmup from 0. cosine and linear decay to 0 at `total_steps`; rsqrt is
    lr * sqrt(T / (T + steps_after_warmup)) with T = `rsqrt_timescale` (default:
    warmup_steps, or 10,000 without warmup), i.e. lr * sqrt(warmup / step) by default.
  cooldown_steps: 0 (default) or N: the last N steps ramp the schedule linearly down to 0
    (meant for rsqrt and constant; it applies to every schedule).
  b1, b2, eps, weight_decay: of AdamW / LAMB. Weight decay is decoupled (multiplied by
    the learning rate) and masked by parameter path (`decays`).
  decay_embeddings: True (default): positional embeddings, class tokens and attention-pool
    probes are decayed like matrices; False leaves them undecayed.
  grad_clip_norm: 0/None (default: no clipping) or the maximum global gradient norm.
  image_lr_mult, text_lr_mult: 1.0 (default): learning-rate multipliers of the params
    under image_tower/image_proj and text_tower/text_proj. log_scale and bias use 1.0.
  layer_decay: None (default) or d in (0, 1]: layer-wise learning-rate decay per tower;
    block i of L gets d^(L - i), the embeddings d^(L + 1), everything after the blocks
    (final norm, pooling head, projection) 1.0.
  frozen: () (default): names of params (top level such as "image_tower", or a path
    prefix such as "image_tower/encoder/block_0") whose updates are exactly zero and
    that have no optimizer state (LiT-style locked towers). Gradient clipping then sees
    only the trainable gradients.

Multipliers scale the whole update of a parameter, weight decay included, exactly as a
per-parameter learning rate would.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxmedclip import config_schema
from jaxmedclip.config_schema import OPTIMIZERS, SCHEDULES  # noqa: F401 (their home was here)

# Top-level parameters of each tower (TwoTower): what the per-tower multipliers scale.
TOWER_PARAMS = {"image": ("image_tower", "image_proj"), "text": ("text_tower", "text_proj")}
# Tower-level parameters that come before the transformer blocks (layer decay d^(L + 1)).
INPUT_EMBEDDINGS = ("patch_embed", "cls", "pos_embed", "token_embed")
# Learned vectors added to or prepended to the tokens (not decayed if decay_embeddings=False).
POSITION_AND_CLASS_EMBEDDINGS = ("pos_embed", "cls", "probe")
# Never decayed: biases, norm gains, the temperature and the sigmoid-loss bias.
NO_DECAY_NAMES = ("bias", "scale", "log_scale")

_BLOCK = re.compile(r"block_(\d+)")
_SCANNED_BLOCKS = "blocks"

OptimConfig = ml_collections.ConfigDict | Mapping[str, Any]


def _complete(optim_config: OptimConfig) -> dict[str, Any]:
    """`optim` checked, every declared field filled (`config_schema`; idempotent)."""
    return config_schema.complete_section("optim", optim_config)


def path_names(path: Sequence[Any]) -> tuple[str, ...]:
    """The dict keys of a pytree path, e.g. ('image_tower', 'encoder', 'block_0', ...).

    Attribute keys are skipped: boxed (`nn.Partitioned`) parameters add a `.value` step.
    """
    names = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            names.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            names.append(str(key.idx))
    return tuple(names)


# ----------------------------------------------------------------------------------------
# Schedules.


def peak_learning_rate(optim_config: OptimConfig, global_batch_size: int | None = None) -> float:
    """`learning_rate`, scaled linearly by global_batch_size / base_batch_size if set."""
    optim_config = _complete(optim_config)
    lr = optim_config["learning_rate"]
    base = optim_config["base_batch_size"]
    if base is None:
        return lr
    if int(base) <= 0:
        raise ValueError(f"optim.base_batch_size={base} must be a positive integer or None")
    if global_batch_size is None:
        raise ValueError(
            f"optim.base_batch_size={base} scales the learning rate by the global batch size; "
            "pass make_optimizer(..., global_batch_size=config.global_batch_size)"
        )
    return lr * int(global_batch_size) / int(base)


def make_schedule(
    optim_config: OptimConfig, total_steps: int, *, global_batch_size: int | None = None
) -> optax.Schedule:
    """Linear warmup to the peak learning rate, then the named schedule (and cooldown)."""
    optim_config = _complete(optim_config)
    lr = peak_learning_rate(optim_config, global_batch_size)
    warmup = optim_config["warmup_steps"]
    cooldown = optim_config["cooldown_steps"]
    name = optim_config["schedule"]
    if warmup < 0 or cooldown < 0:
        raise ValueError(
            f"optim.warmup_steps={warmup} and optim.cooldown_steps={cooldown} must be >= 0"
        )
    if warmup >= total_steps and name != "constant":
        raise ValueError(
            f"optim.warmup_steps={warmup} must be smaller than total_steps={total_steps}"
        )
    if cooldown and warmup + cooldown > total_steps:
        raise ValueError(
            f"optim.warmup_steps={warmup} + optim.cooldown_steps={cooldown} must not exceed "
            f"total_steps={total_steps}"
        )
    warmup_fn = optax.linear_schedule(0.0, lr, max(warmup, 1))
    decay_steps = max(total_steps - warmup, 1)
    if name == "cosine":
        decay_fn = optax.cosine_decay_schedule(lr, decay_steps)
    elif name == "linear":
        decay_fn = optax.linear_schedule(lr, 0.0, decay_steps)
    elif name == "rsqrt":
        timescale = float(optim_config["rsqrt_timescale"] or (warmup or 10_000))
        if timescale <= 0:
            raise ValueError(f"optim.rsqrt_timescale={timescale} must be positive")
        decay_fn = lambda step: lr * jax.lax.rsqrt(1.0 + jnp.asarray(step, jnp.float32) / timescale)
    else:
        decay_fn = optax.constant_schedule(lr)
    schedule = optax.join_schedules([warmup_fn, decay_fn], [warmup])
    if not cooldown:
        return schedule

    def with_cooldown(step):
        remaining = (total_steps - jnp.asarray(step, jnp.float32)) / cooldown
        return schedule(step) * jnp.clip(remaining, 0.0, 1.0)

    return with_cooldown


# ----------------------------------------------------------------------------------------
# Which parameters decay, are frozen, and at what learning-rate multiplier.


def decays(names: Sequence[str], ndim: int, *, decay_embeddings: bool = True) -> bool:
    """Whether the parameter at `names` gets weight decay.

    Not decayed: biases (`bias`, `*_bias`, at any rank: attention biases are [heads, kv]),
    parameters of norm layers (modules named `*norm*`), `log_scale`, the loss `bias`, any
    other vector or scalar, and (with decay_embeddings=False) position embeddings, class
    tokens and attention-pool probes. Matrices and kernels are decayed.
    """
    leaf = names[-1] if names else ""
    if leaf in NO_DECAY_NAMES or leaf.endswith("_bias"):
        return False
    if any("norm" in name for name in names[:-1]):
        return False
    if not decay_embeddings and any(n in POSITION_AND_CLASS_EMBEDDINGS for n in names):
        return False
    # Scanned layers add a leading axis: a stacked vector still is a vector.
    rank = ndim - 1 if _SCANNED_BLOCKS in names else ndim
    return rank >= 2


def decay_mask(params: Any, *, decay_embeddings: bool = True) -> Any:
    """A tree of bools like `params`: True where weight decay applies (see `decays`)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: decays(path_names(path), p.ndim, decay_embeddings=decay_embeddings),
        params,
    )


def frozen_prefixes(optim_config: OptimConfig) -> tuple[tuple[str, ...], ...]:
    """`optim.frozen` as path prefixes: a name, a tuple of names, or "a,b/c"."""
    frozen = _complete(optim_config)["frozen"] or ()
    if isinstance(frozen, str):
        frozen = frozen.split(",")
    prefixes = tuple(tuple(p for p in str(f).strip().split("/") if p) for f in frozen)
    if any(not p for p in prefixes):
        raise ValueError(f"optim.frozen={frozen!r} holds an empty name")
    return prefixes


def frozen_labels(params: Any, prefixes: Sequence[tuple[str, ...]]) -> Any:
    """'frozen' or 'trainable' per parameter; every prefix must match some parameter."""
    paths = [path_names(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for prefix in prefixes:
        if not any(names[: len(prefix)] == prefix for names in paths):
            tops = sorted({names[0] for names in paths if names})
            raise ValueError(
                f"optim.frozen entry {'/'.join(prefix)!r} matches no parameter; top-level "
                f"parameters are {tops} (deeper prefixes are written like "
                f"'image_tower/encoder/block_0')"
            )

    def label(path, _):
        names = path_names(path)
        frozen = any(names[: len(prefix)] == prefix for prefix in prefixes)
        return "frozen" if frozen else "trainable"

    return jax.tree_util.tree_map_with_path(label, params)


def _tower_depths(paths: Sequence[tuple[tuple[str, ...], tuple[int, ...]]]) -> dict[str, int]:
    """Number of transformer blocks under `<tower>/encoder`, unrolled or scanned."""
    depths: dict[str, int] = {}
    for names, shape in paths:
        if len(names) < 3 or names[1] != "encoder":
            continue
        match = _BLOCK.fullmatch(names[2])
        if match:
            depth = int(match.group(1)) + 1
        elif names[2] == _SCANNED_BLOCKS:
            depth = shape[0]
        else:
            continue
        depths[names[0]] = max(depths.get(names[0], 0), depth)
    return depths


def _layer_multiplier(names: tuple[str, ...], depth: int, decay: float) -> float | np.ndarray:
    if len(names) >= 3 and names[1] == "encoder":
        match = _BLOCK.fullmatch(names[2])
        if match:
            return decay ** (depth - int(match.group(1)))
        if names[2] == _SCANNED_BLOCKS:
            return (decay ** (depth - np.arange(depth))).astype(np.float32)
    if len(names) >= 2 and names[1] in INPUT_EMBEDDINGS:
        return decay ** (depth + 1)
    return 1.0


def _multiplier_options(optim_config: OptimConfig) -> tuple[dict[str, float], float | None]:
    towers = {}
    for tower in TOWER_PARAMS:
        field = f"{tower}_lr_mult"
        value = optim_config[field]
        if value < 0:
            raise ValueError(f"optim.{field}={value} must be >= 0")
        towers[tower] = value
    decay = optim_config["layer_decay"]
    if decay is not None:
        if not 0 < decay <= 1:
            raise ValueError(f"optim.layer_decay={decay} must be in (0, 1] (or None: off)")
    return towers, decay


def lr_multipliers(params: Any, optim_config: OptimConfig) -> Any:
    """Per-parameter learning-rate multipliers (tower multiplier x layer decay).

    A tree like `params` of floats, and of float32 [L] arrays for scanned blocks (one
    multiplier per layer slice of the stacked parameter).
    """
    towers, decay = _multiplier_options(_complete(optim_config))
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    depths = _tower_depths([(path_names(p), np.shape(x)) for p, x in flat])
    tower_of = {name: tower for tower, names in TOWER_PARAMS.items() for name in names}

    def multiplier(path, _):
        names = path_names(path)
        tower = tower_of.get(names[0]) if names else None
        if tower is None:
            return 1.0
        value = towers[tower]
        if decay is not None and decay != 1.0 and names[0].endswith("_tower"):
            value = value * _layer_multiplier(names, depths.get(names[0], 0), decay)
        return value

    return jax.tree_util.tree_map_with_path(multiplier, params)


def scale_by_lr_multipliers(
    multipliers_fn: Callable[[Any], Any],
) -> optax.GradientTransformation:
    """Multiplies each update by its multiplier; [L] multipliers scale the leading axis."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params

        def scale(update, multiplier):
            if isinstance(multiplier, float) and multiplier == 1.0:
                return update
            m = jnp.asarray(multiplier, update.dtype)
            return update * m.reshape(m.shape + (1,) * (update.ndim - m.ndim))

        multipliers = multipliers_fn(updates)
        return jax.tree.map(scale, updates, multipliers), state

    return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------------------
# The chain.


def _base_optimizer(
    optim_config: OptimConfig, schedule: optax.Schedule
) -> optax.GradientTransformation:
    decay_embeddings = optim_config["decay_embeddings"]
    mask = lambda params: decay_mask(params, decay_embeddings=decay_embeddings)
    common = dict(
        b1=optim_config["b1"],
        b2=optim_config["b2"],
        eps=optim_config["eps"],
        weight_decay=optim_config["weight_decay"],
        mask=mask,
    )
    if optim_config["name"] == "adamw":
        return optax.adamw(schedule, **common)
    return optax.lamb(schedule, **common)


def make_optimizer(
    optim_config: OptimConfig, total_steps: int, *, global_batch_size: int | None = None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer chain and its base learning-rate schedule (the one to log).

    `global_batch_size` is needed when `optim.base_batch_size` scales the learning rate.
    """
    optim_config = _complete(optim_config)
    schedule = make_schedule(optim_config, total_steps, global_batch_size=global_batch_size)
    towers, layer_decay = _multiplier_options(optim_config)
    prefixes = frozen_prefixes(optim_config)

    trainable = []
    if optim_config["grad_clip_norm"]:
        trainable.append(optax.clip_by_global_norm(optim_config["grad_clip_norm"]))
    trainable.append(_base_optimizer(optim_config, schedule))
    tx = optax.chain(*trainable)
    if prefixes:
        # Frozen params: exactly zero updates, and the masks leave them out of the inner
        # optimizer's state (no moments) and of the clipping norm.
        tx = optax.multi_transform(
            {"trainable": tx, "frozen": optax.set_to_zero()},
            lambda params: frozen_labels(params, prefixes),
        )
    if any(m != 1.0 for m in towers.values()) or layer_decay not in (None, 1.0):
        tx = optax.chain(
            tx, scale_by_lr_multipliers(lambda tree: lr_multipliers(tree, optim_config))
        )
    return tx, schedule
