"""Evaluation entry point: checkpoint -> zero-shot / retrieval / linear-probe report.

  python -m jaxmedclip.evaluate --config experiments/tiny_synthetic.py --workdir /tmp/tiny \
      [--checkpoint STEP] [--split test] [--config.eval.bootstrap_samples=200 ...]

Restores `<workdir>/checkpoints/<STEP>` (default: the latest) and writes
`<workdir>/eval/<STEP>/report.json`, ROC curves as PNG beside it, TensorBoard scalars
under `<workdir>/tensorboard/eval_<split>`, and a summary table on the console. With
`eval.drafting` (default), report drafting is scored too, from the training sentences'
index under `<workdir>/draft_index/<STEP>/` (built on first use: jaxmedclip.draft_report).
With `eval.grounding` (default), phrase grounding where the split's records mark the
findings' regions (synthetic_cxr >= 1.5.0; `evaluation.grounding`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from jaxmedclip import (
    checkpointing,
    config_lib,
    config_schema,
    evaluation,
    models,
    parallel,
    train,
    training,
)
from jaxmedclip.evaluation import report as report_lib

log = logging.getLogger("jaxmedclip.evaluate")


def parse_flags(argv: Sequence[str]):
    """(--checkpoint/--split namespace, train-style namespace, --config.* overrides)."""
    parser = argparse.ArgumentParser(
        prog="python -m jaxmedclip.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        epilog="--config and --workdir (required), --config.field=value overrides and the "
        "multi-process flags work as in python -m jaxmedclip.train.",
    )
    parser.add_argument(
        "--checkpoint", type=int, default=None, help="step to evaluate (default: the latest)"
    )
    parser.add_argument("--split", default=None, help="split to report on (default: eval.split)")
    own, rest = parser.parse_known_args(argv)
    args, overrides = train.parse_flags(rest)
    return own, args, overrides


class ModelSetup(NamedTuple):
    """What restoring and applying a trained model needs: no optimizer, no train step."""

    mesh: Any
    rules: Any
    model: Any
    abstract_params: Any
    param_shardings: Any


def model_setup(config: ml_collections.ConfigDict) -> ModelSetup:
    """The configured model on the configured mesh, with its parameters' shapes and
    shardings (from `jax.eval_shape` of the init; nothing is materialised)."""
    import flax.linen as nn

    config = config_schema.complete(config)
    mesh = parallel.make_mesh(config.mesh)
    rules = parallel.logical_rules(config)
    model = models.build_model(config.model, config.data)
    images, tokens = training.dummy_inputs(config.data)

    def init(rng):
        return model.init(
            rng, jnp.zeros(images.shape, images.dtype), jnp.zeros(tokens.shape, tokens.dtype)
        )["params"]

    boxed = jax.eval_shape(init, jax.random.key(0))
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    return ModelSetup(mesh, rules, model, nn.unbox(boxed), shardings)


def restore_params(
    setup: ModelSetup | training.Setup, workdir: str, step: int | None
) -> tuple[Any, int]:
    """The parameters of checkpoint `step` (default: the latest) of `workdir`, sharded.

    Only the `params` subtree of the saved train state is read (the optimizer state is
    not), so a `ModelSetup` is enough; a `training.Setup` works as well.
    """
    if isinstance(setup, ModelSetup):
        abstract, shardings = setup.abstract_params, setup.param_shardings
    else:
        abstract, shardings = setup.abstract_state.params, setup.shardings.params
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} does not exist; train into --workdir {workdir} first")
    manager = checkpointing.make_manager(workdir)
    try:
        available = list(manager.all_steps())
        if not available:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        if step is not None and step not in available:
            raise FileNotFoundError(
                f"no checkpoint of step {step} in {directory}; available: {sorted(available)}"
            )
        step = manager.latest_step() if step is None else step
        params = checkpointing.restore_params(manager, abstract, shardings, step)
    finally:
        manager.close()
    return params, step


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the evaluation; returns the report (also written as report.json)."""
    training.console_logging(sys.stdout)
    own, args, overrides = parse_flags(sys.argv[1:] if argv is None else argv)
    try:
        config = config_lib.config_from_flags(args.config, overrides)
        cfg = evaluation.eval_config(config)
        parallel.initialize_distributed(
            args.coordinator_address, args.num_processes, args.process_id, args.multihost
        )
        setup = model_setup(config)
        params, step = restore_params(setup, args.workdir, own.checkpoint)
    except (ValueError, KeyError, FileNotFoundError, AttributeError) as e:
        raise SystemExit(f"error: {e}") from None
    split = own.split or cfg.split
    try:
        builder, tokenizer = training.prepare_data(config.data)
    except training.DataError as e:
        raise SystemExit(f"error: {e}") from None
    embedder = evaluation.embed.Embedder(setup.model, setup.mesh, setup.rules)
    draft_index = None
    if cfg.drafting and cfg.zero_shot_findings:
        from jaxmedclip import draft_report

        if jax.process_count() > 1:
            log.info("report drafting skipped: it reads the report texts, which only a "
                     "single process does")
        else:
            try:
                draft_index = draft_report.model_index(
                    config, builder, tokenizer, embedder, params, args.workdir, step
                )
            except draft_report.EmptyIndexError as e:
                log.info("report drafting skipped: %s", e)
    log.info("evaluating step %d of %s on %r", step, args.workdir, split)
    result = evaluation.build_report(
        config,
        setup.model,
        params,
        setup.mesh,
        builder,
        tokenizer,
        split=split,
        run_linear_probe=cfg.linear_probe,
        run_grounding=cfg.grounding,
        step=step,
        embedder=embedder,
        draft_index=draft_index,
    )
    if jax.process_index() == 0:
        directory = report_lib.report_dir(args.workdir, step)
        path = evaluation.write_outputs(result, directory, roc_curves=cfg.roc_curves)
        report_lib.write_tensorboard(
            os.path.join(args.workdir, "tensorboard", f"eval_{split}"),
            step,
            report_lib.flat_metrics(result.report),
        )
        print(report_lib.summary_table(result.report), flush=True)
        log.info("wrote %s", path)
    return result.report


if __name__ == "__main__":
    main()
