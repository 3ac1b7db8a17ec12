"""What a run reports while it trains: metric lines (console, metrics.jsonl,
TensorBoard), the progress bar, and the check that a logged step is finite."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import jax
import numpy as np

from jaxmedclip.evaluation import report as report_lib

log = logging.getLogger("jaxmedclip.train")


def console_logging(stream: TextIO = sys.stdout) -> None:
    """The package's log lines ("jaxmedclip.*", INFO and up) to `stream`, timestamped.

    The entry points' own handler: absl and tensorflow configure the root logger at
    WARNING when imported, so `logging.basicConfig` would do nothing."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    package_log = logging.getLogger("jaxmedclip")
    package_log.handlers[:] = [handler]
    package_log.setLevel(logging.INFO)
    package_log.propagate = False


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
