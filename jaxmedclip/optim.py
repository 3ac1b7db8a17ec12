"""Optimizers and learning-rate schedules (optax) built from `config.optim`."""

from __future__ import annotations

import jax
import ml_collections
import optax

SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw",)


def make_schedule(optim_config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup to `learning_rate`, then the named decay to zero at `total_steps`."""
    lr, warmup = optim_config.learning_rate, optim_config.warmup_steps
    name = optim_config.schedule
    if name not in SCHEDULES:
        raise ValueError(f"optim.schedule={name!r} is unknown; choose one of {SCHEDULES}")
    if warmup >= total_steps and name != "constant":
        raise ValueError(
            f"optim.warmup_steps={warmup} must be smaller than total_steps={total_steps}"
        )
    warmup_fn = optax.linear_schedule(0.0, lr, max(warmup, 1))
    decay_steps = max(total_steps - warmup, 1)
    if name == "cosine":
        decay_fn = optax.cosine_decay_schedule(lr, decay_steps)
    elif name == "linear":
        decay_fn = optax.linear_schedule(lr, 0.0, decay_steps)
    else:
        decay_fn = optax.constant_schedule(lr)
    return optax.join_schedules([warmup_fn, decay_fn], [warmup])


def decay_mask(params) -> object:
    """Weight decay on matrices only: not on biases, norms, temperature or loss bias."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(
    optim_config: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer chain and its learning-rate schedule."""
    if optim_config.name not in OPTIMIZERS:
        raise ValueError(f"optim.name={optim_config.name!r} is unknown; choose one of {OPTIMIZERS}")
    schedule = make_schedule(optim_config, total_steps)
    parts = []
    if optim_config.get("grad_clip_norm"):
        parts.append(optax.clip_by_global_norm(optim_config.grad_clip_norm))
    parts.append(
        optax.adamw(
            schedule,
            b1=optim_config.b1,
            b2=optim_config.b2,
            eps=optim_config.eps,
            weight_decay=optim_config.weight_decay,
            mask=decay_mask,
        )
    )
    return optax.chain(*parts), schedule
