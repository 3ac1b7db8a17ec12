"""Ablation of the medical CLIP methods on the built-in synthetic data (issue #9).

  python benchmarks/ablation.py [--methods clip,medclip,gloria,cxrclip] [--seeds 0,1,2] \
      [--steps 1000] [--workdir /tmp/jaxmedclip_ablation] [--out docs/ablation.md] \
      [--bootstrap_samples 200] [--cpu_devices 8]

Trains every (method, seed) pair for `--steps` steps with `config.seed = seed` (model
initialisation and data order change; the dataset is the same synthetic one, generated
in the default data directory on first use), then evaluates its final checkpoint on the
TEST split with `evaluation.build_report`: zero-shot mean AUC, image->report Recall@10
and the linear probe's mean AUC at 1% of the training labels. Writes a markdown table
(mean ± sd over seeds per method) to `--out` and prints it.

Methods are the experiment files: clip = experiments/tiny_synthetic.py:recipe=clip, medclip =
experiments/medclip_synthetic.py (soft targets from label similarity), gloria =
experiments/gloria_synthetic.py (plus the local word-region loss), cxrclip =
experiments/cxrclip_synthetic.py (two views and two texts per study, image-image and
text-text terms; each step runs the towers on twice the examples).

Each run lives in `<workdir>/<method>/steps<N>_seed<S>/`. A run whose final checkpoint
and `ablation_run.json` (metrics and wall times) exist is reused; a run with its final
checkpoint but no report is only evaluated, so the script can be re-run after an
interruption. Training evaluates nothing on the way (`eval.every_steps=0`); the probe
fits only the 1% fraction; bootstrap CIs use `--bootstrap_samples` resamples.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = {
    "clip": "experiments/tiny_synthetic.py:recipe=clip",
    "medclip": "experiments/medclip_synthetic.py",
    "gloria": "experiments/gloria_synthetic.py",
    "cxrclip": "experiments/cxrclip_synthetic.py",
}
PROBE_FRACTION = 0.01
RUN_FILE = "ablation_run.json"
# (key in a run's metrics, column title), in table order.
METRICS = (
    ("zero_shot_mean_auc", "zero-shot mean AUC"),
    ("i2t_recall@10", "image→report R@10"),
    ("probe_mean_auc@1%", "linear probe AUC @1%"),
)


def parse_list(text: str, kind: type = str) -> list:
    return [kind(item.strip()) for item in text.split(",") if item.strip()]


def parse_flags(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--methods", default="clip,medclip,gloria,cxrclip", help="comma-separated"
    )
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated integers")
    parser.add_argument("--steps", type=int, default=1000, help="training steps per run")
    parser.add_argument("--workdir", default="/tmp/jaxmedclip_ablation")
    parser.add_argument("--out", default=os.path.join(REPO, "docs", "ablation.md"))
    parser.add_argument("--bootstrap_samples", type=int, default=200)
    parser.add_argument(
        "--cpu_devices", type=int, default=8, help="fake CPU devices (sets XLA_FLAGS); 0: leave"
    )
    args = parser.parse_args(argv)
    args.methods = parse_list(args.methods)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        parser.error(f"--methods {unknown or '(empty)'}: choose from {', '.join(METHODS)}")
    try:
        args.seeds = parse_list(args.seeds, int)
    except ValueError:
        parser.error(f"--seeds {args.seeds!r} must be comma-separated integers, e.g. 0,1,2")
    if not args.seeds or args.steps < 1 or args.bootstrap_samples < 0:
        parser.error("need at least one seed, --steps >= 1 and --bootstrap_samples >= 0")
    return args


def run_config(method: str, seed: int, steps: int, bootstrap_samples: int):
    """The experiment's config for one run of the ablation."""
    from jaxmedclip import config_lib

    path, _, arg = METHODS[method].partition(":")
    arg = f"{arg},total_steps={steps}" if arg else f"total_steps={steps}"
    config = config_lib.load_config(f"{os.path.join(REPO, path)}:{arg}")
    config.seed = seed
    config.eval.every_steps = 0  # Only the final checkpoint is evaluated, on test.
    config.eval.split = "test"
    config.eval.bootstrap_samples = bootstrap_samples
    config.eval.probe_fractions = (PROBE_FRACTION,)
    config.eval.roc_curves = False
    return config


def run_dir(workdir: str, method: str, seed: int, steps: int) -> str:
    return os.path.join(workdir, method, f"steps{steps}_seed{seed}")


def headline(report: dict[str, Any]) -> dict[str, float | None]:
    """The ablation's numbers from an evaluation report."""
    i2t = report["retrieval"]["image_to_text"]
    probe = report["linear_probe"]["fractions"]
    return {
        "zero_shot_mean_auc": report["zero_shot"]["mean_auc"],
        "i2t_recall@10": i2t["recall@10"],
        "i2t_recall@10_chance": i2t["chance"]["recall@10"],
        "probe_mean_auc@1%": next(iter(probe.values()))["mean_auc"],
    }


def train_and_evaluate(method: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Trains (or resumes / reuses) one run and evaluates its final checkpoint on test."""

    from input_pipeline import pipeline
    from jaxmedclip import checkpointing, evaluate, evaluation, training
    from jaxmedclip.evaluation import report as report_lib

    directory = run_dir(args.workdir, method, seed, args.steps)
    summary_path = os.path.join(directory, RUN_FILE)
    if os.path.exists(summary_path):
        print(f"[{method} seed {seed}] reusing {summary_path}", flush=True)
        with open(summary_path) as f:
            return json.load(f)

    config = run_config(method, seed, args.steps, args.bootstrap_samples)
    builder, tokenizer = pipeline.prepare(config.data)
    setup = training.build(config, tokenizer.pieces)

    os.makedirs(directory, exist_ok=True)
    manager = checkpointing.make_manager(directory)
    start_step = manager.latest_step() or 0
    manager.close()
    times_path = os.path.join(directory, "ablation_train_time.json")
    if start_step < args.steps:
        print(f"[{method} seed {seed}] training steps {start_step}..{args.steps}", flush=True)
        t0 = time.perf_counter()
        last = training.train(config, directory, setup).metrics
        train_s = time.perf_counter() - t0
        times = {"train_wall_s": train_s, "resumed_from_step": start_step, "last": last}
        with open(times_path, "w") as f:
            json.dump(times, f, indent=2)
    with open(times_path) as f:
        times = json.load(f)

    print(f"[{method} seed {seed}] evaluating on test", flush=True)
    t0 = time.perf_counter()
    params, step = evaluate.restore_params(setup, directory, args.steps)
    result = evaluation.build_report(
        config,
        setup.model,
        params,
        setup.mesh,
        builder,
        tokenizer,
        split="test",
        run_linear_probe=True,
        step=step,
    )
    eval_s = time.perf_counter() - t0
    evaluation.write_outputs(result, report_lib.report_dir(directory, step), roc_curves=False)
    summary = {
        "method": method,
        "config": METHODS[method],
        "seed": seed,
        "step": step,
        "train_wall_s": times["train_wall_s"],
        "resumed_from_step": times["resumed_from_step"],
        "final_loss": times["last"].get("loss"),
        "eval_wall_s": eval_s,
        "bootstrap_samples": args.bootstrap_samples,
        "commit": git_commit(),
        **headline(result.report),
    }
    report_lib.write_json(summary_path, summary)
    return summary


def mean_sd(values: Sequence[float | None], digits: int = 3) -> str:
    """`mean ± sd` (sample sd) of the defined values; one value alone; "-" for none."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def git_commit() -> str:
    """The repository's HEAD commit (short), or "unknown" outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def markdown(runs: list[dict[str, Any]], args: argparse.Namespace, command: str) -> str:
    """The summary table (mean ± sd over seeds per method), the per-run table, the command."""
    titles = [title for _, title in METRICS]
    lines = [
        "| method | " + " | ".join(titles) + " | seeds | steps | train wall s / run |",
        "|---" * (len(titles) + 4) + "|",
    ]
    for method in args.methods:
        rows = [r for r in runs if r["method"] == method]
        cells = [mean_sd([r[key] for r in rows]) for key, _ in METRICS]
        wall = mean_sd([r["train_wall_s"] for r in rows], digits=0)
        lines.append(
            f"| {method} | " + " | ".join(cells) + f" | {len(rows)} | {args.steps} | {wall} |"
        )
    chance = [r["i2t_recall@10_chance"] for r in runs]
    lines += [
        "",
        f"Image→report R@10 at chance: {min(chance):.3f}"
        + (f"–{max(chance):.3f}" if max(chance) - min(chance) > 5e-4 else "")
        + " (reports that are equal text count as hits).",
        "",
        "| method | seed | zero-shot AUC | R@10 | probe @1% | final loss | train s | eval s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        values = [r[key] for key, _ in METRICS]
        shown = " | ".join("-" if v is None else f"{v:.3f}" for v in values)
        resumed = f" (resumed at {r['resumed_from_step']})" if r["resumed_from_step"] else ""
        loss = "-" if r["final_loss"] is None else f"{r['final_loss']:.3f}"
        lines.append(
            f"| {r['method']} | {r['seed']} | {shown} | {loss} | "
            f"{r['train_wall_s']:.0f}{resumed} | {r['eval_wall_s']:.0f} |"
        )
    commits = sorted({r["commit"] for r in runs if r.get("commit")})
    if not all(r.get("commit") for r in runs):
        commits.append(f"not recorded by some runs; HEAD when the table was written {git_commit()}")
    lines += ["", f"Commit: {'; '.join(commits)}.", "", "```", command, "```"]
    return "\n".join(lines)


def write_table(path: str, table: str) -> None:
    """Replaces the text between the markers in `path` (or writes a new file)."""
    begin, end = "<!-- ablation table: begin -->", "<!-- ablation table: end -->"
    text = f"# Ablation\n\n{begin}\n{end}\n"
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    if begin not in text or end not in text:
        text = text.rstrip("\n") + f"\n\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w") as f:
        f.write(f"{head}{begin}\n{table}\n{end}{tail}")


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_flags(argv)
    sys.path.insert(0, REPO)
    from jaxmedclip import config_lib  # Imports no jax.

    if args.cpu_devices:
        config_lib.add_cpu_devices(args.cpu_devices)
    import logging

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("jaxmedclip").setLevel(logging.INFO)

    runs = []
    # Seed-major order: an ablation cut short has the same seeds for every method.
    for seed in args.seeds:
        for method in args.methods:
            runs.append(train_and_evaluate(method, seed, args))
            print(json.dumps(runs[-1]), flush=True)
    runs.sort(key=lambda r: (args.methods.index(r["method"]), r["seed"]))
    command = "python benchmarks/ablation.py " + " ".join(
        [
            f"--methods {','.join(args.methods)}",
            f"--seeds {','.join(map(str, args.seeds))}",
            f"--steps {args.steps}",
            f"--bootstrap_samples {args.bootstrap_samples}",
            f"--cpu_devices {args.cpu_devices}",
        ]
    )
    table = markdown(runs, args, command)
    write_table(args.out, table)
    print(table)
    return runs


if __name__ == "__main__":
    main()
