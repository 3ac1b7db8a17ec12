"""The training run: data from the input pipeline, the loop (step, log, evaluate,
checkpoint, preemption), evaluation during training.

The only module of the training package that imports `input_pipeline` (and with it
tensorflow), when a run starts.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from jaxmedclip import checkpointing, config_schema, evaluation, flops, parallel
from jaxmedclip.training.metrics import MetricsWriter, ProgressBar, finite_metrics
from jaxmedclip.training.preemption import PreemptionWatch
from jaxmedclip.training.resume import record_tokenizer, resume
from jaxmedclip.training.setup import Setup, build, check_tokenizer_fits, with_tokenizer
from jaxmedclip.training.state import TrainState
from jaxmedclip.training.stream import StepInterrupted

log = logging.getLogger("jaxmedclip.train")

DEVICE_PREFETCH = 2  # Batches on their way to the devices while a step runs.


class DataError(ValueError):
    """The data could not be prepared (built, read or tokenized): bad input that the
    message names (a file, a CSV line, the build report), not a bug."""


def prepare_data(data_config: ml_collections.ConfigDict):
    """`pipeline.prepare` (builder, tokenizer), its user errors raised as DataError."""
    from input_pipeline import cli_errors, pipeline  # tensorflow is needed from here on.

    try:
        return pipeline.prepare(data_config)
    except cli_errors.user_errors() as e:
        raise DataError(cli_errors.error_line(e).removeprefix("error: ")) from e


class TrainResult(NamedTuple):
    """What `train` returns: the last logged metrics and the setup that produced them."""

    metrics: dict[str, float]
    setup: Setup


@dataclasses.dataclass
class Run:
    """Everything the loop of one run reads."""

    config: ml_collections.ConfigDict
    workdir: str
    setup: Setup
    policy: checkpointing.CheckpointPolicy
    manager: Any
    writer: MetricsWriter
    builder: Any
    tokenizer: Any
    batches: Iterator[dict[str, np.ndarray]]


def train_batches(
    pipeline: Any, config: ml_collections.ConfigDict, builder: Any, tokenizer: Any, start_step: int
) -> Iterator[dict[str, np.ndarray]]:
    """This process's training batches from batch `start_step` on.

    The data order is a function of (seed, step): a pipeline that takes `start_step`
    starts there directly; otherwise the consumed batches are read and skipped.
    """
    kwargs = dict(global_batch_size=config.global_batch_size, train=True, seed=config.seed)
    args = (config.data, builder, tokenizer, "train")
    if "start_step" in inspect.signature(pipeline.make_dataset).parameters:
        return pipeline.make_dataset(*args, start_step=start_step, **kwargs).as_numpy_iterator()
    return pipeline.make_dataset(*args, **kwargs).skip(start_step).as_numpy_iterator()


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    setup: Setup | None = None,
    *,
    allow_data_position_change: bool = False,
) -> TrainResult:
    """Runs (or resumes) the configured training; returns the last logged metrics and
    the setup used.

    `setup` (from `build`, e.g. built to check the config before any data) is completed
    with the tokenizer here, so that what depends on it (`loss.local`'s word starts) is
    right whoever built it. A workdir that holds checkpoints resumes from the newest
    readable one, refusing a config whose seed or global batch size differ from it
    unless `allow_data_position_change`.
    """
    config = config_schema.complete(config)
    os.makedirs(workdir, exist_ok=True)
    builder, tokenizer = prepare_data(config.data)
    from input_pipeline import pipeline

    check_tokenizer_fits(config, tokenizer.vocab_size)
    record_tokenizer(workdir, tokenizer.model_path)
    pieces = tokenizer.pieces
    setup = with_tokenizer(setup, config, pieces) if setup else build(config, pieces)

    policy = checkpointing.CheckpointPolicy.from_config(config)
    writer = MetricsWriter(workdir)
    manager = checkpointing.make_manager(workdir, policy)
    try:
        state, start_step = resume(
            config, manager, setup, allow_data_position_change=allow_data_position_change
        )
        if jax.process_index() == 0:  # The config of the run that last wrote here.
            with open(os.path.join(workdir, "config.json"), "w") as f:
                f.write(config.to_json_best_effort(indent=2, sort_keys=True))
        batches = train_batches(pipeline, config, builder, tokenizer, start_step)
        run = Run(config, workdir, setup, policy, manager, writer, builder, tokenizer, batches)
        return TrainResult(loop(run, state, start_step), setup)
    finally:
        # Pending asynchronous saves complete even when the loop stops on an error.
        manager.wait_until_finished()
        manager.close()
        writer.close()


def loop(run: Run, state: TrainState, start_step: int) -> dict:
    """The training loop from `start_step` on (see `train`); returns the last logged
    metrics."""
    config, setup, policy = run.config, run.setup, run.policy
    manager, writer, batches = run.manager, run.writer, run.batches
    mesh, model, train_step = setup.mesh, setup.model, setup.train_step
    progress = ProgressBar(start_step, config.total_steps)
    eval_cfg = evaluation.eval_config(config)
    eval_every = eval_cfg.every_steps
    embedder = evaluation.embed.Embedder(model, mesh, setup.rules) if eval_every else None
    checkpoint_every = config.checkpoint_every
    step_tflops = flops.train_flops_per_step(config) / mesh.size / 1e12
    peak = flops.peak_tflops(jax.devices()[0].device_kind)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    log.info(
        "mesh %s, %d parameters, global batch %d, %d steps",
        dict(mesh.shape),
        num_params,
        config.global_batch_size,
        config.total_steps,
    )

    def save(step: int, ranking: dict[str, float] | None = None) -> None:
        checkpointing.save(
            manager,
            step,
            state,
            data=checkpointing.DataPosition.from_config(config, step),
            config=config,
            metrics=ranking,
            force=True,
        )

    if getattr(train_step, "takes_device_batches", False):
        # The next batches are copied to the devices while this step runs.
        batches = parallel.prefetch_to_device(batches, mesh, DEVICE_PREFETCH)
        run_step = lambda state, batch, _: train_step(state, batch)
    else:
        # A streamed step takes the host batch; a bare `step(state, global_batch)` (e.g. a
        # wrapped step in a test) gets it as global arrays.
        run_step = getattr(train_step, "from_host", None) or (
            lambda state, host_batch, _: train_step(state, parallel.host_to_global(
                host_batch, mesh)))
    last: dict[str, float] = {}
    interval_start, interval_steps, data_wait = time.perf_counter(), 0, 0.0
    try:
        with PreemptionWatch() as preemption:
            for step in range(start_step + 1, config.total_steps + 1):
                t0 = time.perf_counter()
                batch = next(batches)
                data_wait += time.perf_counter() - t0
                try:
                    state, metrics = run_step(
                        state, batch, lambda: preemption.should_stop(sync=True))
                except StepInterrupted:  # Streamed: stopped between micro-batches.
                    log.info("preempted during step %d: saving step %d, exiting", step,
                             step - 1)
                    if step - 1 > 0 and manager.latest_step() != step - 1:
                        save(step - 1)
                    break
                # Streamed: copying micro-batches to the devices, in both passes.
                data_wait += getattr(train_step, "transfer_s", 0.0)
                interval_steps += 1
                progress.update(step)
                is_last = step == config.total_steps
                is_log = step % config.log_every == 0 or step == start_step + 1 or is_last
                is_eval = bool(eval_every) and (step % eval_every == 0 or is_last)
                is_checkpoint = is_last or bool(checkpoint_every and step % checkpoint_every == 0)
                if is_log or is_eval or is_checkpoint:
                    # Never log, evaluate or save a state that came from a non-finite step:
                    # the last good checkpoint stays the latest one.
                    metrics = finite_metrics(metrics, step, manager)
                if is_log:
                    elapsed = time.perf_counter() - interval_start
                    last = {
                        **metrics,
                        "samples_per_s": interval_steps * config.global_batch_size / elapsed,
                        "step_time_s": elapsed / interval_steps,
                        "data_wait_s": data_wait / interval_steps,
                        "tflops_per_device": step_tflops * interval_steps / elapsed,
                    }
                    if peak is not None:
                        last["mfu"] = last["tflops_per_device"] / peak
                    progress.clear()
                    writer.write(step, last)
                ranking = None
                if is_eval:
                    progress.clear()
                    results = evaluate_splits(run, eval_cfg, state, step, embedder)
                    ranking = best_metric_value(policy, results, step)
                stop = not is_last and preemption.should_stop(sync=is_log)
                if stop and not (is_log or is_eval or is_checkpoint):
                    metrics = finite_metrics(metrics, step, manager)
                if is_checkpoint or stop or ranking is not None:
                    save(step, ranking)
                if is_log:  # Timing excludes logging, evaluation and starting saves.
                    interval_start, interval_steps, data_wait = time.perf_counter(), 0, 0.0
                if stop:
                    log.info("preempted: saved step %d, exiting", step)
                    break
    finally:
        progress.clear()
    return last


def evaluate_splits(run: Run, eval_cfg: Any, state: TrainState, step: int,
                    embedder: Any) -> dict[str, float]:
    """Runs the evaluators on every configured split; logs and returns their metrics."""
    results: dict[str, float] = {}
    for split in eval_cfg.splits:
        prefix = "eval/" if len(eval_cfg.splits) == 1 else f"eval_{split}/"
        metrics = evaluation.evaluate(
            run.config,
            run.setup.model,
            state.params,
            run.setup.mesh,
            run.builder,
            run.tokenizer,
            split,
            run.workdir,
            step=step,
            prefix=prefix,
            embedder=embedder,
        )
        run.writer.write(step, metrics)
        results.update(metrics)
    return results


def best_metric_value(
    policy: checkpointing.CheckpointPolicy, results: Mapping[str, float], step: int
) -> dict[str, float] | None:
    """`{best_metric: value}` to rank this step's checkpoint by, or None."""
    if policy.best_metric is None:
        return None
    if policy.best_metric not in results:
        log.error(
            "checkpoint_best_metric %r is not among the evaluation metrics of step %d (%s); "
            "the checkpoint is not ranked",
            policy.best_metric,
            step,
            ", ".join(sorted(results)),
        )
        return None
    return {policy.best_metric: float(results[policy.best_metric])}
