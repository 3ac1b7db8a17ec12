"""Orbax checkpoints under `<workdir>/checkpoints/<step>/`.

Each checkpoint has three items:

- `state/`: the train state (parameters, optimizer state, step), saved asynchronously and
  restored straight into the mesh's shardings;
- `data/`: the data position (`DataPosition` as JSON): which batch comes next and what
  fixes the order of the batches (seed, global batch size);
- `config/`: the run's config as JSON, to see what produced a checkpoint.

Retention (`CheckpointPolicy`): the last `keep` checkpoints are kept, and in addition the
`keep_best` best ones by an evaluation metric (one manager, orbax's `LatestN` or `BestN`
preservation policies; the metric values are stored beside each checkpoint by orbax).

A checkpoint that cannot be read is reported, moved to `<workdir>/checkpoints_unreadable/`
(never deleted) and the one before it is used; see `restore_latest_readable`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from jaxmedclip import config_schema

log = logging.getLogger("jaxmedclip.checkpointing")

CHECKPOINTS = "checkpoints"
UNREADABLE = "checkpoints_unreadable"


class ResumeError(ValueError):
    """The workdir's checkpoints cannot be resumed by this run (what to do is in the text)."""


@dataclasses.dataclass(frozen=True)
class DataPosition:
    """Where the training data stands after `step` batches: the pipeline's order is a
    function of (seed, global_batch_size, step), so these three continue it exactly.
    (Checkpoints written before may hold more keys; `from_json` ignores them.)"""

    step: int
    seed: int
    global_batch_size: int

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, step: int) -> DataPosition:
        return cls(int(step), int(config.seed), int(config.global_batch_size))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, values: Mapping[str, Any]) -> DataPosition:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def check_data_position(
    saved: DataPosition, config: ml_collections.ConfigDict, *, allow_change: bool = False
) -> list[str]:
    """Fails when the config would continue a different sequence of batches.

    Returns the differences (empty when none); with `allow_change` they are returned
    instead of raised.
    """
    differences = [
        f"{name}={getattr(saved, name)} in the checkpoint, {int(config[name])} in the config"
        for name in ("seed", "global_batch_size")
        if int(config[name]) != getattr(saved, name)
    ]
    if differences and not allow_change:
        raise ResumeError(
            f"the checkpoint of step {saved.step} was written by a run with a different data "
            f"order: {'; '.join(differences)}. Resuming would not continue its sequence of "
            "batches. Use the checkpoint's values, a new --workdir, or pass "
            "--allow_data_position_change to resume with the new ones anyway"
        )
    return differences


@dataclasses.dataclass(frozen=True)
class CheckpointPolicy:
    """Which checkpoints are kept: the last `keep`, plus the `keep_best` best by
    `best_metric` (a key of the logged evaluation metrics; None: no best ones kept)."""

    keep: int = config_schema.FIELDS["checkpoint_keep"].default
    best_metric: str | None = None
    best_mode: str = config_schema.FIELDS["checkpoint_best_mode"].default
    keep_best: int = config_schema.FIELDS["checkpoint_keep_best"].default

    def __post_init__(self):
        if self.keep < 1:
            raise ValueError(f"checkpoint_keep={self.keep} must be at least 1")
        if self.best_mode not in ("max", "min"):
            raise ValueError(f"checkpoint_best_mode={self.best_mode!r} must be 'max' or 'min'")
        if self.best_metric is not None and self.keep_best < 1:
            raise ValueError(
                f"checkpoint_keep_best={self.keep_best} must be at least 1 when "
                f"checkpoint_best_metric={self.best_metric!r} is set"
            )

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> CheckpointPolicy:
        """From `checkpoint_keep`, `checkpoint_best_metric`, `checkpoint_best_mode` and
        `checkpoint_keep_best` of a completed config (`config_schema.complete`)."""
        config = config_schema.filled("", {k: v for k, v in config.items()
                                            if k.startswith("checkpoint_")})
        return cls(keep=config.checkpoint_keep, best_metric=config.checkpoint_best_metric or None,
                   best_mode=config.checkpoint_best_mode, keep_best=config.checkpoint_keep_best)

    def metric_value(self) -> Callable[[Mapping[str, float]], float]:
        """Orders checkpoints worst to best (a checkpoint without the metric is worst)."""
        worst = -np.inf if self.best_mode == "max" else np.inf

        def value(metrics: Mapping[str, float]) -> float:
            return float(metrics.get(self.best_metric, worst))

        return value


def checkpoint_dir(workdir: str) -> str:
    return _join(workdir, CHECKPOINTS)


def _join(workdir: str, name: str) -> str:
    root = workdir if "://" in workdir else os.path.abspath(workdir)
    return os.path.join(root, name)


def make_manager(workdir: str, policy: CheckpointPolicy | None = None) -> ocp.CheckpointManager:
    """The manager of `<workdir>/checkpoints` (asynchronous saves, `policy` retention)."""
    policy = policy or CheckpointPolicy()
    preserve = [checkpoint_managers.LatestN(n=policy.keep)]
    best_fn = None
    if policy.best_metric is not None:
        best_fn = policy.metric_value()
        preserve.append(
            checkpoint_managers.BestN(
                get_metric_fn=best_fn,
                reverse=policy.best_mode == "min",  # BestN keeps the end of the sorted list.
                n=policy.keep_best,
                keep_checkpoints_without_metrics=False,
            )
        )
    options = ocp.CheckpointManagerOptions(
        create=True,
        enable_async_checkpointing=True,
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(preserve),
        # Set so that orbax stores each checkpoint's metrics and can tell the best step;
        # which checkpoints are kept is decided by `preservation_policy` alone.
        best_fn=best_fn,
        best_mode=policy.best_mode,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    *,
    data: DataPosition | None = None,
    config: ml_collections.ConfigDict | Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    force: bool = False,
) -> bool:
    """Starts an asynchronous save of `state` (and the data position and config) at `step`.

    `metrics`: values to rank the checkpoint by (only the policy's best metric matters).
    Returns whether a save was started.
    """
    items: dict[str, Any] = {"state": ocp.args.StandardSave(state)}
    if data is not None:
        items["data"] = ocp.args.JsonSave(data.to_json())
    if config is not None:
        if isinstance(config, ml_collections.ConfigDict):
            config = json.loads(config.to_json_best_effort())
        items["config"] = ocp.args.JsonSave(dict(config))
    if metrics is not None:
        metrics = {k: float(v) for k, v in metrics.items()}
    return manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)


class Restored(NamedTuple):
    state: Any
    step: int
    data: DataPosition | None
    config: dict[str, Any] | None


def _target(abstract_state: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )


def restore(
    manager: ocp.CheckpointManager, abstract_state: Any, shardings: Any, step: int | None = None
) -> tuple[Any, int] | None:
    """Restores the train state of `step` (default: the latest) into `shardings`; None if
    there is no checkpoint."""
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    args = ocp.args.Composite(state=ocp.args.StandardRestore(_target(abstract_state, shardings)))
    return manager.restore(step, args=args).state, step


def restore_params(
    manager: ocp.CheckpointManager, abstract_params: Any, shardings: Any, step: int
) -> Any:
    """Only the `params` subtree of checkpoint `step`'s train state, into `shardings`
    (the optimizer state stays on disk)."""
    target = {"params": _target(abstract_params, shardings)}
    restore = ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True,
    )
    return manager.restore(step, args=ocp.args.Composite(state=restore)).state["params"]


def restore_all(
    manager: ocp.CheckpointManager, abstract_state: Any, shardings: Any, step: int
) -> Restored:
    """Restores every item of checkpoint `step` (raises whatever orbax raises)."""
    directory = epath.Path(manager.directory) / str(step)
    names = {p.name for p in directory.iterdir() if p.is_dir()}
    items: dict[str, Any] = {"state": ocp.args.StandardRestore(_target(abstract_state, shardings))}
    items.update({name: ocp.args.JsonRestore() for name in ("data", "config") if name in names})
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    data = restored.get("data") if "data" in items else None
    return Restored(
        state=restored.state,
        step=step,
        data=None if data is None else DataPosition.from_json(data),
        config=restored.get("config") if "config" in items else None,
    )


def _all_finite(tree: Any) -> bool:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return bool(jax.jit(lambda xs: jnp.all(jnp.stack([jnp.isfinite(x).all() for x in xs])))(leaves))


def _agreed(ok: bool) -> bool:
    """True only if `ok` on every process (so that all of them fall back together)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _try_restore(manager, abstract_state, shardings, step) -> tuple[Restored | None, str]:
    try:
        restored = restore_all(manager, abstract_state, shardings, step)
    except Exception as e:  # noqa: BLE001 - any failure to read means "unreadable".
        reason = f"{type(e).__name__}: {e}"
        return None, reason.splitlines()[0][:500]
    if int(restored.state.step) != step:
        return None, f"its train state is at step {int(restored.state.step)}, not {step}"
    if not _all_finite(restored.state):
        return None, "it holds non-finite values"
    return restored, ""


def quarantine(manager: ocp.CheckpointManager, step: int) -> str:
    """Moves checkpoint `step` out of the manager's directory (next to it, never deleted)."""
    source = epath.Path(manager.directory) / str(step)
    target_dir = epath.Path(manager.directory).parent / UNREADABLE
    target = target_dir / str(step)
    if jax.process_index() == 0:
        target_dir.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target = target_dir / f"{step}.{int(time.time())}"
        source.rename(target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"jaxmedclip_quarantine_{step}")
    manager.reload()
    return str(target)


def restore_latest_readable(
    manager: ocp.CheckpointManager, abstract_state: Any, shardings: Any
) -> Restored | None:
    """Restores the newest checkpoint that can be read; None if there are none.

    Each unreadable checkpoint (files missing, truncated or corrupted; a state of the
    wrong step or with non-finite values) is reported with its step and the reason. Once
    an older one has been read, the unreadable newer ones are moved to
    `<workdir>/checkpoints_unreadable/<step>` so that new saves do not collide with them
    and the retention policy never counts them (a bad checkpoint cannot push a good one
    out). If none can be read, nothing is moved and a ResumeError lists them all.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    failures: list[tuple[int, str]] = []
    for step in steps:
        restored, reason = _try_restore(manager, abstract_state, shardings, step)
        if not _agreed(restored is not None):
            reason = reason or "another process could not read it"
            log.error("checkpoint step %d in %s is unreadable: %s", step, manager.directory, reason)
            failures.append((step, reason))
            continue
        for bad, _ in failures:
            moved = quarantine(manager, bad)
            log.error("moved unreadable checkpoint step %d to %s", bad, moved)
        if failures:
            log.warning("resuming from checkpoint step %d instead", step)
        return restored
    if failures:
        listing = "; ".join(f"step {s}: {r}" for s, r in failures)
        raise ResumeError(
            f"none of the {len(failures)} checkpoints in {manager.directory} can be read "
            f"({listing}). Move them away to start from scratch, or repair them"
        )
    return None
