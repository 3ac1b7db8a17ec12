"""Training entry point: config -> mesh -> data -> state -> loop.

  python -m jaxmedclip.train --config experiments/tiny_synthetic.py --workdir /tmp/tiny \
      [--config.total_steps=100 --config.optim.learning_rate=3e-4 ...]

Effects (files, clocks, logging) live here; the model, loss and train step are pure.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple, TextIO

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from input_pipeline import label_prompts
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
# The run's SentencePiece model, copied into the workdir (what export reads).
WORKDIR_TOKENIZER = "tokenizer.model"


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
    parser.add_argument(
        "--allow_data_position_change",
        action="store_true",
        help="resume a checkpoint written with another seed or global_batch_size (the data "
        "order then differs from an uninterrupted run)",
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
    return args, config_lib.override_flags(parser, rest)


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
        "step_time_s",
        "data_wait_s",
        "tflops_per_device",
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


class ProgressBar:
    """One `\\r`-redrawn line with steps/s and ETA, shown when the stream is a terminal (and
    only by process 0); log lines clear it first."""

    WIDTH = 30

    def __init__(self, start_step: int, total_steps: int, stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        self.enabled = jax.process_index() == 0 and self.stream.isatty()
        self.start_step, self.total_steps = start_step, total_steps
        self.first: tuple[int, float] | None = None  # Timed from the first step: no compile.
        self.shown, self.last_draw = False, 0.0

    def update(self, step: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.first is None:
            self.first = (step, now)
        if now - self.last_draw < 0.1 and step != self.total_steps:
            return
        done = step - self.first[0]
        rate = done / (now - self.first[1]) if done else 0.0
        eta = format_duration((self.total_steps - step) / rate) if rate else "?"
        filled = int(self.WIDTH * step / max(self.total_steps, 1))
        bar = "#" * filled + "." * (self.WIDTH - filled)
        self.stream.write(
            f"\r[{bar}] step {step}/{self.total_steps} {rate:.2f} steps/s ETA {eta}\033[K"
        )
        self.stream.flush()
        self.shown, self.last_draw = True, now

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.shown = False


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def check_config(config: ml_collections.ConfigDict) -> None:
    for field in ("total_steps", "global_batch_size", "log_every"):
        if int(config[field]) <= 0:
            raise ValueError(f"{field}={config[field]} must be a positive integer")
    data_views = bool(config.data.get("multiview", False))
    if trainer.multiview_enabled(config.loss) and not data_views:
        raise ValueError(
            "loss.multiview (the CXR-CLIP terms) needs a second view and text per example: "
            "set data.multiview=True (and data.augment; see input_pipeline/multiview.py)"
        )
    if data_views and not trainer.multiview_enabled(config.loss):
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
    the loss settings that need one for every example (`DecoupledData` refuses
    data.multiview, which loss.multiview needs)."""
    decoupled = label_prompts.DecoupledData.from_config(config.data)
    if decoupled is None or not decoupled.text_only_fraction:
        return
    fraction = f"data.decoupled.text_only_fraction={decoupled.text_only_fraction}"
    targets = config.loss.get("targets", "one_hot")
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
    abstract_state: trainer.TrainState
    shardings: trainer.TrainState
    train_step: Any


def local_loss_enabled(config: ml_collections.ConfigDict) -> bool:
    """Whether `loss.local` (GLoRIA-style word-region alignment) is on."""
    local = config.loss.get("local")
    return local is not None and local.get("weight", 1.0) > 0


def build(config: ml_collections.ConfigDict, word_starts: np.ndarray | None = None) -> Setup:
    """Builds mesh, model, optimizer and step; a config that does not fit fails here.

    `word_starts` (bool [vocab], from the tokenizer's pieces) is needed by `loss.local`;
    without it an all-True table of the configured vocabulary stands in, which has the
    same shapes and cost (enough for `--compile_only`), not the same word boundaries.
    """
    if word_starts is None and local_loss_enabled(config):
        word_starts = np.ones(config.data.vocab_size, bool)
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
        word_starts=word_starts,
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
    batch = {
        "image": images,
        "tokens": tokens,
        "study_id": jax.ShapeDtypeStruct((b,), jnp.int32),
        "text_id": jax.ShapeDtypeStruct((b,), jnp.int32),
        "labels": jax.ShapeDtypeStruct((b, num_labels), jnp.float32),
        "labels_present": jax.ShapeDtypeStruct((b, num_labels), jnp.bool_),
        "mask": jax.ShapeDtypeStruct((b,), jnp.bool_),
    }
    if config.data.get("multiview", False):  # input_pipeline/multiview.py
        batch.update(image2=images, tokens2=tokens, text_id2=batch["text_id"])
    if config.data.get("decoupled") is not None:  # input_pipeline/label_prompts.py
        batch.update(label_prompt=batch["mask"], image_mask=batch["mask"],
                     text_mask=batch["mask"])
    return batch


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
        "mesh": " ".join(f"{k}={v}" for k, v in setup.mesh.shape.items()),
        "devices": setup.mesh.size,
        "global_batch_size": config.global_batch_size,
        # Sizes of the compiled SPMD program: what each device holds.
        "argument_gib_per_device": memory.argument_size_in_bytes / gib,
        "temp_gib_per_device": memory.temp_size_in_bytes / gib,
        "output_gib_per_device": memory.output_size_in_bytes / gib,
        "alias_gib_per_device": memory.alias_size_in_bytes / gib,
        "xla_tflops_per_device": float((cost or {}).get("flops", float("nan"))) / 1e12,
        "model_tflops_per_device": flops.train_flops_per_step(config) / setup.mesh.size / 1e12,
        "model_tflops_per_step": flops.train_flops_per_step(config) / 1e12,
    }
    # Donated state aliases the outputs: peak is roughly arguments + temporaries + outputs
    # that are not aliased.
    report["peak_gib_per_device"] = (
        report["argument_gib_per_device"]
        + report["temp_gib_per_device"]
        + report["output_gib_per_device"]
        - report["alias_gib_per_device"]
    )
    return report


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


def init_from_pretrained(
    config: ml_collections.ConfigDict, state: trainer.TrainState, setup: Setup
) -> trainer.TrainState:
    """A fresh state whose towers `config.init_from` loads from a Hugging Face folder.

    `config.init_from = ConfigDict(dict(path=..., towers=("image",)))` (safetensors only);
    projections, temperature and optimizer state stay as initialised. Only at step 0: a
    resumed run keeps its checkpoint.
    """
    init = config.get("init_from")
    if not init or not init.get("path"):
        return state
    from jaxmedclip import convert

    towers = tuple(init.get("towers", ("image", "text")))
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
) -> tuple[trainer.TrainState, int]:
    """The newest readable checkpoint's state and step, or a fresh state at step 0."""
    restored = checkpointing.restore_latest_readable(manager, setup.abstract_state, setup.shardings)
    if restored is None:
        state, _ = trainer.create_train_state(
            setup.model, setup.tx, config.data, setup.mesh, setup.rules, config.seed
        )
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


def finite_metrics(metrics: Mapping[str, Any], step: int, manager: Any) -> dict[str, float]:
    """The step's metrics as floats; a non-finite one stops the run (nothing is saved)."""
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    bad = sorted(k for k, v in metrics.items() if not np.isfinite(v))
    if bad:
        raise FloatingPointError(
            f"non-finite {', '.join(bad)} at step {step} (loss={metrics['loss']}); "
            f"stopping. The last good checkpoint in {manager.directory} is step "
            f"{manager.latest_step()}"
        )
    return metrics


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    setup: Setup | None = None,
    *,
    allow_data_position_change: bool = False,
) -> dict:
    """Runs (or resumes) the configured training; returns the last logged metrics.

    A workdir that holds checkpoints resumes from the newest readable one, refusing a
    config whose seed or global batch size differ from it unless
    `allow_data_position_change`.
    """
    os.makedirs(workdir, exist_ok=True)
    from input_pipeline import pipeline  # tensorflow is needed from here on only.

    builder, tokenizer = pipeline.prepare(config.data)
    if tokenizer.vocab_size > config.data.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} pieces but data.vocab_size="
            f"{config.data.vocab_size}; raise data.vocab_size"
        )
    record_tokenizer(workdir, tokenizer.model_path)
    if setup is None:
        word_starts = None
        if local_loss_enabled(config):
            from jaxmedclip.methods import local_alignment

            word_starts = local_alignment.word_start_table(tokenizer.pieces)
            # Pieces beyond the tokenizer's (data.vocab_size is an upper bound) never occur.
            word_starts = np.pad(word_starts, (0, config.data.vocab_size - len(word_starts)))
        setup = build(config, word_starts)

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
        data = (builder, tokenizer, batches)
        return _loop(config, workdir, setup, policy, manager, writer, data, state, start_step)
    finally:
        # Pending asynchronous saves complete even when the loop stops on an error.
        manager.wait_until_finished()
        manager.close()
        writer.close()


def _loop(config, workdir, setup, policy, manager, writer, data, state, start_step) -> dict:
    """The training loop from `start_step` on (see `train`)."""
    builder, tokenizer, batches = data
    mesh, model, train_step = setup.mesh, setup.model, setup.train_step
    progress = ProgressBar(start_step, config.total_steps)
    eval_cfg = evaluation.eval_config(config)
    eval_every = eval_cfg.every_steps
    embedder = evaluation.embed.Embedder(model, mesh, setup.rules) if eval_every else None
    checkpoint_every = int(config.get("checkpoint_every") or 0)
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

    last: dict[str, float] = {}
    interval_start, interval_steps, data_wait = time.perf_counter(), 0, 0.0
    try:
        with PreemptionWatch() as preemption:
            for step in range(start_step + 1, config.total_steps + 1):
                t0 = time.perf_counter()
                host_batch = next(batches)
                data_wait += time.perf_counter() - t0
                state, metrics = train_step(state, parallel.host_to_global(host_batch, mesh))
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
                    results = evaluate_splits(
                        config,
                        eval_cfg,
                        setup,
                        state,
                        builder,
                        tokenizer,
                        workdir,
                        step,
                        embedder,
                        writer,
                    )
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


def evaluate_splits(
    config, eval_cfg, setup, state, builder, tokenizer, workdir, step, embedder, writer
) -> dict[str, float]:
    """Runs the evaluators on every configured split; logs and returns their metrics."""
    results: dict[str, float] = {}
    for split in eval_cfg.splits:
        prefix = "eval/" if len(eval_cfg.splits) == 1 else f"eval_{split}/"
        metrics = evaluation.evaluate(
            config,
            setup.model,
            state.params,
            setup.mesh,
            builder,
            tokenizer,
            split,
            workdir,
            step=step,
            prefix=prefix,
            embedder=embedder,
        )
        writer.write(step, metrics)
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
    try:
        train(
            config,
            args.workdir,
            setup,
            allow_data_position_change=args.allow_data_position_change,
        )
    except checkpointing.ResumeError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
