"""What a run is made of (mesh, model, optimizer, state shardings, train step), built and
checked before any data is read; the abstract batch; the ahead-of-time compile report."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from jaxmedclip import (
    batch_schema,
    checkpointing,
    config_schema,
    evaluation,
    flops,
    models,
    optim,
    parallel,
)
from jaxmedclip.methods import local_alignment
from jaxmedclip.training.objective import multiview_enabled
from jaxmedclip.training.state import TrainState, create_train_state, state_shardings
from jaxmedclip.training.step import make_train_step


def check_config(config: ml_collections.ConfigDict) -> None:
    """The checks across sections of a completed config (`config_schema.complete` checks
    each field; the typed objects of a section check their own fields together)."""
    for field in ("total_steps", "global_batch_size", "log_every"):
        if int(config[field]) <= 0:
            raise ValueError(f"{field}={config[field]} must be a positive integer")
    data_views = config.data.multiview
    if multiview_enabled(config.loss) and not data_views:
        raise ValueError(
            "loss.multiview (the CXR-CLIP terms) needs a second view and text per example: "
            "set data.multiview=True (and data.augment; see input_pipeline/stages/views.py)"
        )
    if data_views and not multiview_enabled(config.loss):
        raise ValueError(
            "data.multiview=True reads a second view and text per example that only "
            "loss.multiview uses: set loss.multiview (e.g. an empty ConfigDict for the "
            "default weights) or data.multiview=False"
        )
    check_text_only_examples(config)
    policy = checkpointing.CheckpointPolicy.from_config(config)
    if policy.best_metric is not None and not evaluation.eval_config(config).every_steps:
        raise ValueError(
            f"checkpoint_best_metric={policy.best_metric!r} ranks checkpoints by an evaluation "
            "metric, but eval.every_steps is 0 (no evaluation); set eval.every_steps"
        )


def check_text_only_examples(config: ml_collections.ConfigDict) -> None:
    """Text-label examples (`data.decoupled.text_only_fraction`) lack an image: refuses
    the loss settings that need one for every example (the input pipeline checks the
    group's own fields and refuses data.multiview with it, which loss.multiview needs)."""
    decoupled = config.data.decoupled
    text_only = decoupled.text_only_fraction if decoupled is not None else 0.0
    if not text_only:
        return
    fraction = f"data.decoupled.text_only_fraction={text_only}"
    targets = config.loss.targets
    if targets != "soft_labels":
        raise ValueError(
            f"{fraction} needs loss.targets='soft_labels': a report without its image has "
            f"no positive under loss.targets={targets!r}, only label similarity gives it a "
            "target (MedCLIP); set loss.targets='soft_labels' or text_only_fraction=0"
        )
    if local_loss_enabled(config):
        raise ValueError(
            f"{fraction} with loss.local: the local alignment term (GLoRIA) matches each "
            "report's words to its own image's regions, which a text-label example lacks; "
            "switch one of them off"
        )


class Setup(NamedTuple):
    """What a run is made of, checked before any data is built or memory spent."""

    mesh: jax.sharding.Mesh
    rules: tuple
    model: Any
    tx: Any
    abstract_state: TrainState
    shardings: TrainState
    train_step: Any
    # bool [vocab] of `loss.local`: the tokenizer's word starts, or an all-True stand-in
    # of the same shape before the tokenizer exists (`with_tokenizer` replaces it).
    word_starts: np.ndarray | None = None
    word_starts_from_tokenizer: bool = False


def local_loss_enabled(config: ml_collections.ConfigDict) -> bool:
    """Whether `loss.local` (GLoRIA-style word-region alignment) is on."""
    local = config.loss.local
    return local is not None and local.weight > 0


def needs_word_starts(config: ml_collections.ConfigDict) -> bool:
    """Whether the local term aligns words (it then needs the tokenizer's word starts);
    with `model.local_text="sentence"` it reads one pooled feature per text."""
    return local_loss_enabled(config) and config.model.get("local_text", "words") != "sentence"


def check_tokenizer_fits(config: ml_collections.ConfigDict, num_pieces: int) -> None:
    """Token ids index the text tower's embedding table of `data.vocab_size` rows."""
    if num_pieces > config.data.vocab_size:
        raise ValueError(
            f"the tokenizer has {num_pieces} pieces but data.vocab_size="
            f"{config.data.vocab_size}; raise data.vocab_size"
        )


def word_starts_of(config: ml_collections.ConfigDict, pieces: Sequence[str] | None
                   ) -> np.ndarray | None:
    """`loss.local`'s word-start table (bool [data.vocab_size]) from the tokenizer's
    pieces, an all-True stand-in without them, or None when no local term aligns words."""
    if not needs_word_starts(config):
        return None
    if pieces is None:
        return np.ones(config.data.vocab_size, bool)
    check_tokenizer_fits(config, len(pieces))
    # Pieces beyond the tokenizer's (data.vocab_size is an upper bound) never occur.
    table = local_alignment.word_start_table(pieces)
    return np.pad(table, (0, config.data.vocab_size - len(table)))


def with_tokenizer(setup: Setup, config: ml_collections.ConfigDict,
                   pieces: Sequence[str]) -> Setup:
    """`setup` for training with the tokenizer whose pieces are given: the train step is
    rebuilt with the real word starts when `loss.local` needs them, else unchanged."""
    if setup.word_starts_from_tokenizer or not needs_word_starts(config):
        return setup
    word_starts = word_starts_of(config, pieces)
    train_step = _train_step(config, setup.model, setup.tx, setup.train_step.schedule,
                             setup.mesh, setup.rules, setup.shardings, word_starts)
    return setup._replace(train_step=train_step, word_starts=word_starts,
                          word_starts_from_tokenizer=True)


def _train_step(config, model, tx, schedule, mesh, rules, shardings, word_starts):
    return make_train_step(
        model, tx, schedule, config.loss, mesh, rules, shardings,
        microbatch_size=config.microbatch_size, word_starts=word_starts,
        stream_microbatches=config.stream_microbatches,
        global_batch_size=config.global_batch_size)


def build(config: ml_collections.ConfigDict, pieces: Sequence[str] | None = None) -> Setup:
    """Builds mesh, model, optimizer and step; a config that does not fit fails here.

    `pieces` (the tokenizer's piece of every id) give `loss.local` its word starts.
    Without them an all-True table of the configured vocabulary stands in: the same
    shapes and cost (enough to check a config or `--compile_only`), not the same word
    boundaries; `with_tokenizer` then gives the setup a training run must use.
    """
    config = config_schema.complete(config)
    word_starts = word_starts_of(config, pieces)
    check_config(config)
    mesh = parallel.make_mesh(config.mesh)
    parallel.check_batch_size(config.global_batch_size, mesh)
    rules = parallel.logical_rules(config)
    model = models.build_model(config.model, config.data)
    tx, schedule = optim.make_optimizer(
        config.optim, config.total_steps, global_batch_size=config.global_batch_size
    )
    abstract_state, shardings = state_shardings(model, tx, config.data, mesh, rules)
    train_step = _train_step(config, model, tx, schedule, mesh, rules, shardings, word_starts)
    # Tracing the step on abstract inputs checks the loss settings and every shape.
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for jitted, args in train_step.abstract_pieces(abstract_state,
                                                       abstract_batch(config)).values():
            jax.eval_shape(jitted, *args)
    return Setup(mesh, rules, model, tx, abstract_state, shardings, train_step, word_starts,
                 pieces is not None)


def initial_state(setup: Setup, config: ml_collections.ConfigDict) -> TrainState:
    """A fresh train state of `setup` from `config.seed`, created in its sharded layout
    (the setup's shardings: the init is not traced again)."""
    state, _ = create_train_state(setup.model, setup.tx, config.data, setup.mesh,
                                  setup.rules, config.seed, setup.shardings)
    return state


def abstract_batch(config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
    """The global training batch the input pipeline produces, as shapes and dtypes
    (`jaxmedclip.batch_schema`, the schema the pipeline's batches are checked against)."""
    fields = batch_schema.batch_fields(config.data, config.global_batch_size, train=True)
    return {name: jax.ShapeDtypeStruct(shape, dtype) for name, (shape, dtype) in fields.items()}


def compile_report(config: ml_collections.ConfigDict, setup: Setup) -> dict[str, float]:
    """Compiles the train step ahead of time for the configured mesh; memory and FLOPs.

    A streamed step (`stream_microbatches`) is compiled piece by piece (embed, loss,
    backward, update: they run one after another, so the peak is the largest piece's);
    each piece's figures are reported under its name, with the feature buffer's size."""
    gib = 1024**3
    pieces = setup.train_step.abstract_pieces(setup.abstract_state, abstract_batch(config))
    report: dict[str, Any] = {
        "mesh": " ".join(f"{k}={v}" for k, v in setup.mesh.shape.items()),
        "devices": setup.mesh.size,
        "global_batch_size": config.global_batch_size,
    }
    peaks, xla_flops = [], 0.0
    for name, (jitted, args) in pieces.items():
        with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
            compiled = jitted.lower(*args).compile()
        memory = compiled.memory_analysis()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        # Sizes of the compiled SPMD program: what each device holds.
        figures = {
            "argument_gib_per_device": memory.argument_size_in_bytes / gib,
            "temp_gib_per_device": memory.temp_size_in_bytes / gib,
            "output_gib_per_device": memory.output_size_in_bytes / gib,
            "alias_gib_per_device": memory.alias_size_in_bytes / gib,
        }
        # Donated arguments alias the outputs: the peak is roughly arguments + temporaries
        # + outputs that are not aliased.
        figures["peak_gib_per_device"] = (
            figures["argument_gib_per_device"] + figures["temp_gib_per_device"]
            + figures["output_gib_per_device"] - figures["alias_gib_per_device"])
        peaks.append(figures["peak_gib_per_device"])
        # The embed and backward pieces run once per micro-batch.
        repeat = getattr(setup.train_step, "num_micro", 1) if name in ("embed", "backward") else 1
        xla_flops += repeat * float((cost or {}).get("flops", float("nan")))
        if len(pieces) == 1:
            report.update(figures)
        else:
            report.update({f"{name}/{key}": value for key, value in figures.items()})
    if len(pieces) > 1:
        buffer = pieces["loss"][1][1]
        report["feature_buffer_gib_per_device"] = sum(
            x.size * x.dtype.itemsize for x in jax.tree.leaves(buffer)
        ) / parallel.batch_shards(setup.mesh) / gib
        report["peak_gib_per_device"] = max(peaks)
    report.update({
        "xla_tflops_per_device": xla_flops / 1e12,
        "model_tflops_per_device": flops.train_flops_per_step(config) / setup.mesh.size / 1e12,
        "model_tflops_per_step": flops.train_flops_per_step(config) / 1e12,
    })
    return report
