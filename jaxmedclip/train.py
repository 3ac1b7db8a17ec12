"""Training entry point: config -> mesh -> data -> state -> loop.

  python -m jaxmedclip.train --config experiments/tiny_synthetic.py --workdir /tmp/tiny \
      [--config.total_steps=100 --config.optim.learning_rate=3e-4 ...]

Effects (files, clocks, logging) live here; the model, loss and train step are pure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from input_pipeline.findings import CHEXPERT_FINDINGS
from jaxmedclip import (
    checkpointing,
    config_lib,
    evaluation,
    flops,
    models,
    optim,
    parallel,
    trainer,
)
from jaxmedclip.evaluation import report as report_lib

log = logging.getLogger("jaxmedclip.train")


def parse_flags(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """`--config path.py[:arg]`, `--workdir DIR`, and any number of `--config.a.b=value`."""
    parser = argparse.ArgumentParser(
        prog="python -m jaxmedclip.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", required=True, help="experiment file, e.g. experiments/x.py:arg"
    )
    parser.add_argument("--workdir", required=True, help="where logs and checkpoints go")
    parser.add_argument(
        "--compile_only",
        action="store_true",
        help="compile the train step for the configured mesh, print memory and FLOPs, exit",
    )
    cluster = parser.add_argument_group("multi-process (see launch/)")
    cluster.add_argument("--coordinator_address", help="host:port of process 0")
    cluster.add_argument("--num_processes", type=int)
    cluster.add_argument("--process_id", type=int)
    cluster.add_argument(
        "--multihost",
        action="store_true",
        help="discover the cluster automatically (TPU pod slices, SLURM)",
    )
    args, rest = parser.parse_known_args(argv)
    overrides = []
    for item in rest:
        if not item.startswith("--config."):
            parser.error(
                f"unrecognised argument {item!r}; overrides look like --config.field=value"
            )
        overrides.append(item[len("--config.") :])
    return args, overrides


class MetricsWriter:
    """Console lines, one JSON object per logged step in `<workdir>/metrics.jsonl`, and
    TensorBoard scalars under `<workdir>/tensorboard/train`. Only process 0 writes."""

    SHOWN = (
        "loss",
        "acc_i2t",
        "scale",
        "learning_rate",
        "grad_norm",
        "samples_per_s",
        "mfu",
        "eval/zero_shot_mean_auc",
        "eval/i2t_recall@10",
    )

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tensorboard = None
        if self.enabled:
            self.tensorboard = report_lib.TensorBoardWriter(
                os.path.join(workdir, "tensorboard", "train")
            )

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in sorted(metrics.items())}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        self.tensorboard.write(step, values)
        shown = " ".join(f"{k}={values[k]:.4g}" for k in self.SHOWN if k in values)
        log.info("step %d %s", step, shown)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def check_config(config: ml_collections.ConfigDict) -> None:
    for field in ("total_steps", "global_batch_size", "log_every"):
        if int(config[field]) <= 0:
            raise ValueError(f"{field}={config[field]} must be a positive integer")


class Setup(NamedTuple):
    """What a run is made of, checked before any data is built or memory spent."""

    mesh: jax.sharding.Mesh
    rules: tuple
    model: Any
    tx: Any
    abstract_state: trainer.TrainState
    shardings: trainer.TrainState
    train_step: Any


def build(config: ml_collections.ConfigDict) -> Setup:
    """Builds mesh, model, optimizer and step; a config that does not fit fails here."""
    check_config(config)
    mesh = parallel.make_mesh(config.mesh)
    parallel.check_batch_size(config.global_batch_size, mesh)
    rules = parallel.logical_rules(config)
    model = models.build_model(config.model, config.data)
    tx, schedule = optim.make_optimizer(
        config.optim, config.total_steps, global_batch_size=config.global_batch_size
    )
    abstract_state, shardings = trainer.state_shardings(model, tx, config.data, mesh, rules)
    train_step = trainer.make_train_step(
        model,
        tx,
        schedule,
        config.loss,
        mesh,
        rules,
        shardings,
        microbatch_size=config.get("microbatch_size"),
    )
    # Tracing the step on abstract inputs checks the loss settings and every shape.
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        jax.eval_shape(train_step.jitted, abstract_state, abstract_batch(config))
    return Setup(mesh, rules, model, tx, abstract_state, shardings, train_step)


def abstract_batch(config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch the input pipeline produces, as shapes and dtypes."""
    b = config.global_batch_size
    images, tokens = trainer.dummy_inputs(config.data, b)
    num_labels = len(CHEXPERT_FINDINGS)
    return {
        "image": images,
        "tokens": tokens,
        "study_id": jax.ShapeDtypeStruct((b,), jnp.int32),
        "text_id": jax.ShapeDtypeStruct((b,), jnp.int32),
        "labels": jax.ShapeDtypeStruct((b, num_labels), jnp.float32),
        "labels_present": jax.ShapeDtypeStruct((b, num_labels), jnp.bool_),
        "mask": jax.ShapeDtypeStruct((b,), jnp.bool_),
    }


def compile_report(config: ml_collections.ConfigDict, setup: Setup) -> dict[str, float]:
    """Compiles the train step ahead of time for the configured mesh; memory and FLOPs."""
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
        compiled = setup.train_step.jitted.lower(
            setup.abstract_state, abstract_batch(config)
        ).compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    gib = 1024**3
    report = {
        "devices": setup.mesh.size,
        "argument_gib": memory.argument_size_in_bytes / gib,
        "output_gib": memory.output_size_in_bytes / gib,
        "temp_gib": memory.temp_size_in_bytes / gib,
        "alias_gib": memory.alias_size_in_bytes / gib,
        "xla_tflops_per_device": float((cost or {}).get("flops", float("nan"))) / 1e12,
        "model_tflops_per_device": flops.train_flops_per_step(config) / setup.mesh.size / 1e12,
    }
    # Donated state aliases the outputs: peak is roughly arguments + temporaries + outputs
    # that are not aliased.
    report["peak_gib_per_device"] = (
        report["argument_gib"] + report["temp_gib"] + report["output_gib"] - report["alias_gib"]
    )
    return report


def train(config: ml_collections.ConfigDict, workdir: str, setup: Setup | None = None) -> dict:
    """Runs (or resumes) the configured training; returns the last logged metrics."""
    mesh, rules, model, tx, abstract_state, shardings, train_step = setup or build(config)

    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))

    from input_pipeline import pipeline  # tensorflow is needed from here on only.

    builder, tokenizer = pipeline.prepare(config.data)
    if tokenizer.vocab_size > config.data.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} pieces but data.vocab_size="
            f"{config.data.vocab_size}; raise data.vocab_size"
        )

    manager = checkpointing.make_manager(workdir)
    restored = checkpointing.restore(manager, abstract_state, shardings)
    if restored is None:
        state, _ = trainer.create_train_state(model, tx, config.data, mesh, rules, config.seed)
        start_step = 0
    else:
        state, start_step = restored
        log.info("resumed from %s at step %d", manager.directory, start_step)

    dataset = pipeline.make_dataset(
        config.data,
        builder,
        tokenizer,
        "train",
        global_batch_size=config.global_batch_size,
        train=True,
        seed=config.seed,
    )
    # The data order is a function of (seed, step): skipping the consumed batches resumes
    # exactly where an uninterrupted run would be.
    batches = dataset.skip(start_step).as_numpy_iterator()

    writer = MetricsWriter(workdir)
    eval_cfg = evaluation.eval_config(config)
    eval_every = eval_cfg.every_steps
    embedder = evaluation.embed.Embedder(model, mesh, rules) if eval_every else None
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
    last: dict[str, float] = {}
    interval_start, interval_steps, data_wait = time.perf_counter(), 0, 0.0
    try:
        with PreemptionWatch() as preemption:
            for step in range(start_step + 1, config.total_steps + 1):
                t0 = time.perf_counter()
                batch = parallel.host_to_global(next(batches), mesh)
                data_wait += time.perf_counter() - t0
                state, metrics = train_step(state, batch)
                interval_steps += 1
                is_log = step % config.log_every == 0 or step in (
                    start_step + 1,
                    config.total_steps,
                )
                is_checkpoint = (
                    bool(config.checkpoint_every) and step % config.checkpoint_every == 0
                )
                if is_log or is_checkpoint:
                    # Never log or save a state that came from a non-finite step: the last good
                    # checkpoint stays the latest one.
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    bad = sorted(k for k, v in metrics.items() if not np.isfinite(v))
                    if bad:
                        raise FloatingPointError(
                            f"non-finite {', '.join(bad)} at step {step} (loss={metrics['loss']}); "
                            f"stopping. The last good checkpoint in {manager.directory} is step "
                            f"{manager.latest_step()}"
                        )
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
                    writer.write(step, last)
                    interval_start, interval_steps, data_wait = time.perf_counter(), 0, 0.0
                if eval_every and (step % eval_every == 0 or step == config.total_steps):
                    for split in eval_cfg.splits:
                        prefix = "eval/" if len(eval_cfg.splits) == 1 else f"eval_{split}/"
                        writer.write(
                            step,
                            evaluation.evaluate(
                                config,
                                model,
                                state.params,
                                mesh,
                                builder,
                                tokenizer,
                                split,
                                workdir,
                                step=step,
                                prefix=prefix,
                                embedder=embedder,
                            ),
                        )
                if is_checkpoint:
                    checkpointing.save(manager, step, state)
                if step < config.total_steps and preemption.should_stop(sync=is_log):
                    log.info("preempted: saving step %d and exiting", step)
                    checkpointing.save(manager, step, state, force=True)
                    break
            else:
                if config.total_steps > start_step and manager.latest_step() != config.total_steps:
                    checkpointing.save(manager, config.total_steps, state, force=True)
    finally:
        # Pending asynchronous saves complete even when the loop stops on an error.
        manager.wait_until_finished()
        manager.close()
        writer.close()
    return last


class PreemptionWatch:
    """SIGTERM / SIGINT ask the loop to save and stop at the next step boundary.

    With several processes the request is agreed on at logging steps (every process stops
    at the same step); a single process stops at the next step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self):
        self.requested = False
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        log.info("received signal %d", signum)
        self.requested = True

    def should_stop(self, sync: bool) -> bool:
        if jax.process_count() == 1:
            return self.requested
        if not sync:
            return False
        flags = multihost_utils.process_allgather(np.asarray(self.requested))
        return bool(np.any(flags))

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


def main(argv: Sequence[str] | None = None) -> None:
    # Our own handler: absl/tensorflow configure the root logger at WARNING when imported.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    package_log = logging.getLogger("jaxmedclip")
    package_log.handlers[:] = [handler]
    package_log.setLevel(logging.INFO)
    package_log.propagate = False
    args, overrides = parse_flags(sys.argv[1:] if argv is None else argv)
    try:
        config = config_lib.config_from_flags(args.config, overrides)
        parallel.initialize_distributed(
            args.coordinator_address, args.num_processes, args.process_id, args.multihost
        )
        setup = build(config)
    except (ValueError, KeyError, FileNotFoundError, AttributeError) as e:
        raise SystemExit(f"error: {e}") from None
    if args.compile_only:
        report = compile_report(config, setup)
        for key, value in report.items():
            print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
        return
    train(config, args.workdir, setup)


if __name__ == "__main__":
    main()
