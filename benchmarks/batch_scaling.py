"""Batch-size scaling study on the built-in synthetic data (issue #16).

  python benchmarks/batch_scaling.py [--batches 64,256,1024,4096] [--samples 131072] \
      [--workdir /tmp/jaxmedclip_scaling] [--out docs/batch_scaling.md] [--quick]

Trains the tiny "clip" recipe (experiments/tiny_synthetic.py:recipe=clip) at each global
batch size for the same number of samples seen (`--samples`), through the command a
user types (`python -m jaxmedclip.train`), then evaluates the final checkpoint on the
test split (`python -m jaxmedclip.evaluate`). Batches above `--stream_above` run through
GradCache streamed from host memory (`stream_microbatches=True`, micro-batches of
`--microbatch`); the smaller ones in one piece.

The rule as the batch grows (B0 = 64, the recipe's own batch, LR0 = its 2e-3):
  steps         = samples / B
  learning rate = LR0 at every batch (AdamW's step size does not grow with the batch;
                  square-root scaling, 4e-3 at batch 256, collapsed that run: the loss
                  sat at log 256 with gradient norms of 3e-4 from step 51 on)
  warm-up       = 31 steps (the batch-64 run's: 1.5% of its 2,048 steps, as the recipe's
                  30 of 2,000), at most a quarter of the run's steps. Warming up for
                  1.5% of the steps at every batch collapsed the batch-1,024 run (2
                  warm-up steps; the loss sat at log 1,024 from step 12 on)
Everything else is the recipe's (cosine decay to 0, weight decay 0.1, 8 fake devices).

Writes a markdown report with a table (batch, steps, learning rate, wall time, zero-shot
mean AUC, image->report R@10, final loss) and a PNG plot beside it, and prints the
table. A run whose `scaling_run.json` exists is reused (the study can be re-run after an
interruption). `--quick` is the test's: batches 16 and 64 (64 streamed) on a 256-study
dataset for 256 samples each, written under --workdir unless --out is given.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = "experiments/tiny_synthetic.py:recipe=clip"
BASE_LR, WARMUP_STEPS = 2e-3, 31
RUN_FILE = "scaling_run.json"
REPORT = "report.json"  # What `python -m jaxmedclip.evaluate` writes in report_dir.
COLUMNS = ("batch", "steps", "learning rate", "warm-up", "GradCache", "train wall time",
           "zero-shot mean AUC", "image→report R@10", "final loss")


def learning_rate(batch: int) -> float:
    del batch  # The same peak rate at every batch (module doc).
    return BASE_LR


def warmup_steps(steps: int) -> int:
    return max(1, min(WARMUP_STEPS, steps // 4))


def parse_flags(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="64,256,1024,4096", help="comma-separated")
    parser.add_argument("--samples", type=int, default=131_072,
                        help="samples seen by every run (steps = samples / batch)")
    parser.add_argument("--stream_above", type=int, default=256,
                        help="batches above this stream micro-batches from the host")
    parser.add_argument("--microbatch", type=int, default=256)
    parser.add_argument("--workdir", default="/tmp/jaxmedclip_scaling")
    parser.add_argument("--out", default=None,
                        help="the report (default docs/batch_scaling.md; --quick: workdir)")
    parser.add_argument("--quick", action="store_true", help="a minute-long smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.samples, args.stream_above, args.microbatch = "16,64", 256, 16, 16
    try:
        args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        parser.error(f"--batches {args.batches!r} must be comma-separated integers")
    bad = [b for b in args.batches if b <= 0 or args.samples % b or b % 8]
    if not args.batches or bad:
        parser.error(f"--batches {bad or '(empty)'}: each must be a positive multiple of 8 "
                     f"(the devices) that divides --samples={args.samples}")
    if args.out is None:
        args.out = (os.path.join(args.workdir, "batch_scaling.md") if args.quick
                    else os.path.join(REPO, "docs", "batch_scaling.md"))
    return args


def overrides(batch: int, args: argparse.Namespace) -> list[str]:
    """The `--config.*` fields of one run (the rule of the module doc)."""
    steps = args.samples // batch
    fields = [
        f"global_batch_size={batch}", f"total_steps={steps}",
        f"optim.learning_rate={learning_rate(batch)}", f"optim.warmup_steps={warmup_steps(steps)}",
        f"log_every={max(1, steps // 10)}", "eval.every_steps=0",
    ]
    if batch > args.stream_above:
        fields += [f"microbatch_size={args.microbatch}", "stream_microbatches=True"]
    if args.quick:
        fields += ["data.synthetic.num_train=256", "data.synthetic.num_validation=64",
                   "data.synthetic.num_test=64", "model.image.depth=1", "model.text.depth=1",
                   f"data.data_dir={os.path.join(args.workdir, 'tfds')}"]
    return fields


def _run(command: list[str], log_path: str) -> float:
    """Runs `command` (output to `log_path`); its wall time; a failure names the log."""
    env = dict(os.environ)
    env.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        code = subprocess.call(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if code:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{' '.join(command)} failed (exit {code}); log {log_path}:\n{tail}")
    return time.perf_counter() - t0


def train_and_evaluate(batch: int, args: argparse.Namespace) -> dict[str, Any]:
    from jaxmedclip.evaluation import report as report_lib

    directory = os.path.join(args.workdir, f"batch{batch}")
    summary_path = os.path.join(directory, RUN_FILE)
    if os.path.exists(summary_path):
        print(f"[batch {batch}] reusing {summary_path}", flush=True)
        with open(summary_path) as f:
            return json.load(f)
    os.makedirs(directory, exist_ok=True)
    fields = [f"--config.{field}" for field in overrides(batch, args)]
    common = ["--config", RECIPE, "--workdir", directory, *fields]
    steps = args.samples // batch
    print(f"[batch {batch}] training {steps} steps", flush=True)
    train_s = _run([sys.executable, "-m", "jaxmedclip.train", *common],
                   os.path.join(directory, "train.log"))
    print(f"[batch {batch}] evaluating on test", flush=True)
    _run([sys.executable, "-m", "jaxmedclip.evaluate", *common, "--split", "test",
          "--config.eval.linear_probe=False", "--config.eval.roc_curves=False"],
         os.path.join(directory, "evaluate.log"))
    with open(os.path.join(directory, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    train_records = [r for r in records if "loss" in r]
    with open(os.path.join(report_lib.report_dir(directory, steps), REPORT)) as f:
        report = json.load(f)
    summary = {
        "batch": batch, "steps": steps, "learning_rate": learning_rate(batch),
        "warmup_steps": warmup_steps(steps), "streamed": batch > args.stream_above,
        "microbatch_size": args.microbatch if batch > args.stream_above else None,
        "train_wall_s": train_s,
        "zero_shot_mean_auc": report["zero_shot"]["mean_auc"],
        "i2t_recall@10": report["retrieval"]["image_to_text"]["recall@10"],
        "final_loss": train_records[-1]["loss"],
        "samples_per_s": train_records[-1].get("samples_per_s"),
        "data_wait_s": train_records[-1].get("data_wait_s"),
    }
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cache = f"streamed, micro-batch {r['microbatch_size']}" if r["streamed"] else "-"
        lines.append(
            f"| {r['batch']:,} | {r['steps']:,} | {r['learning_rate']:.2e} | "
            f"{r['warmup_steps']} | {cache} | {r['train_wall_s'] / 60:.1f} min | "
            f"{r['zero_shot_mean_auc']:.3f} | {r['i2t_recall@10']:.3f} | "
            f"{r['final_loss']:.3f} |")
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = [r["batch"] for r in rows]
    fig, auc_axis = plt.subplots(figsize=(6, 4))
    auc_axis.plot(batches, [r["zero_shot_mean_auc"] for r in rows], "o-", color="tab:blue",
                  label="zero-shot mean AUC (test)")
    auc_axis.set_xscale("log", base=2)
    auc_axis.set_xlabel("global batch size (equal samples seen)")
    auc_axis.set_ylabel("zero-shot mean AUC", color="tab:blue")
    loss_axis = auc_axis.twinx()
    loss_axis.plot(batches, [r["final_loss"] for r in rows], "s--", color="tab:red",
                   label="final training loss")
    loss_axis.set_ylabel("final training loss", color="tab:red")
    auc_axis.set_title("tiny CLIP recipe on the synthetic data: batch scaling")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_flags(sys.argv[1:] if argv is None else argv)
    os.makedirs(args.workdir, exist_ok=True)
    rows = [train_and_evaluate(batch, args) for batch in args.batches]
    png = os.path.splitext(args.out)[0] + ".png"
    plot(rows, png)
    text = table(rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    header = (f"<!-- written by benchmarks/batch_scaling.py {' '.join(argv or sys.argv[1:])};"
              " the text around the table is edited by hand -->\n")
    body = f"{text}\n\n![AUC and loss against batch size]({os.path.basename(png)})\n"
    if os.path.exists(args.out) and not args.quick:
        with open(args.out) as f:
            old = f.read()
        start, end = old.find("<!-- table -->"), old.find("<!-- /table -->")
        if start >= 0 and end > start:  # Keep the hand-written discussion around it.
            body = old[: start + len("<!-- table -->")] + "\n" + body + old[end:]
            header = ""
    if header:
        body = header + "# Batch-size scaling study\n\n<!-- table -->\n" + body + \
            "<!-- /table -->\n"
    with open(args.out, "w") as f:
        f.write(body)
    print(text)
    print(f"wrote {args.out} and {png}")
    return rows


if __name__ == "__main__":
    main()
