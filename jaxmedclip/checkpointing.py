"""Orbax checkpoints of the train state under `<workdir>/checkpoints/<step>`."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def make_manager(workdir: str, max_to_keep: int = 3) -> ocp.CheckpointManager:
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(directory, options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, *, force: bool = False) -> None:
    manager.save(step, args=ocp.args.StandardSave(state), force=force)


def restore(
    manager: ocp.CheckpointManager, abstract_state: Any, shardings: Any, step: int | None = None
) -> tuple[Any, int] | None:
    """Restores `step` (default: the latest) into `shardings`; None if there is none."""
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )
    state = manager.restore(step, args=ocp.args.StandardRestore(target))
    return state, step
