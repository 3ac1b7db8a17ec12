"""Where a run starts: the newest readable checkpoint (its data position checked), or a
fresh state, optionally with towers from a Hugging Face folder (`init_from`); and the
tokenizer a workdir's checkpoints were trained with."""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import ml_collections
from jax.experimental import multihost_utils

from jaxmedclip import checkpointing
from jaxmedclip.training.setup import Setup, initial_state
from jaxmedclip.training.state import TrainState

log = logging.getLogger("jaxmedclip.train")
# The run's SentencePiece model, copied into the workdir (what export reads).
WORKDIR_TOKENIZER = "tokenizer.model"


def init_from_pretrained(
    config: ml_collections.ConfigDict, state: TrainState, setup: Setup
) -> TrainState:
    """A fresh state whose towers `config.init_from` loads from a Hugging Face folder.

    `config.init_from = ConfigDict(dict(path=..., towers=("image",)))` (safetensors only);
    projections, temperature and optimizer state stay as initialised. Only at step 0: a
    resumed run keeps its checkpoint.
    """
    init = config.init_from
    if init is None or not init.path:
        return state
    from jaxmedclip import convert

    towers = tuple(init.towers)
    params = convert.load_pretrained(
        multihost_utils.process_allgather(state.params, tiled=True),
        init.path,
        towers=towers,
        model_config=config.model,
    )
    params = jax.tree.map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]),
        params,
        setup.shardings.params,
    )
    log.info("initialised the %s tower(s) from %s", " and ".join(towers), init.path)
    return state.replace(params=params)


def record_tokenizer(workdir: str, model_path: str) -> str:
    """Copies the run's SentencePiece model to `<workdir>/tokenizer.model` (process 0), so
    that export finds the tokenizer of the checkpoints without the dataset (and without
    tensorflow). A workdir whose copy has another vocabulary is refused: its checkpoints
    were trained with other token ids."""
    from etils import epath

    from jaxmedclip.convert.tokenizer import vocabulary_signature

    path = os.path.join(workdir, WORKDIR_TOKENIZER)
    model = epath.Path(model_path).read_bytes()
    if os.path.exists(path):
        with open(path, "rb") as f:
            if vocabulary_signature(f.read()) == vocabulary_signature(model):
                return path
        raise checkpointing.ResumeError(
            f"{path}, the tokenizer this workdir's checkpoints were trained with, differs from "
            f"the data config's tokenizer {model_path}; train into a new --workdir, or delete "
            f"{path} to continue these checkpoints with the new token ids"
        )
    if jax.process_index() == 0:
        partial = f"{path}.partial-{os.getpid()}"
        with open(partial, "wb") as f:
            f.write(model)
        os.replace(partial, path)  # Readers never see half a file.
    return path


def resume(
    config: ml_collections.ConfigDict,
    manager: Any,
    setup: Setup,
    *,
    allow_data_position_change: bool = False,
) -> tuple[TrainState, int]:
    """The newest readable checkpoint's state and step, or a fresh state at step 0."""
    restored = checkpointing.restore_latest_readable(manager, setup.abstract_state, setup.shardings)
    if restored is None:
        state = initial_state(setup, config)
        return init_from_pretrained(config, state, setup), 0
    if restored.data is None:
        log.warning("checkpoint step %d has no data position; not checked", restored.step)
    else:
        changed = checkpointing.check_data_position(
            restored.data, config, allow_change=allow_data_position_change
        )
        if changed:
            log.warning("resuming with another data order: %s", "; ".join(changed))
    log.info("resumed from %s at step %d", manager.directory, restored.step)
    return restored.state, restored.step
