"""Steady-state speed of the train step of a config, on synthetic batches (no dataset).

  python benchmarks/train_step.py --config experiments/tiny_synthetic.py \
      [--config.global_batch_size=128 ...] [--steps 20] [--warmup 3] [--cpu_devices 8]

Builds the mesh, model, optimizer and jitted train step exactly as `jaxmedclip.train`
does, creates random batches of the config's shapes (images, token ids, labels) on the
mesh, compiles, runs `--warmup` steps, then times `--steps` steps with one
`block_until_ready` at the end (dispatch overlaps compute as in training: the mean step
time), then `--steps` more, each waited for (the median step time). The input pipeline
is not included. Prints samples/s, step time, analytic TFLOPs per device
(`jaxmedclip/flops.py`), MFU where the chip's peak is known and the peak device memory
(the allocator's peak on GPU/TPU; on CPU the compiled programs' account); `--json FILE`
appends the result as one JSON line. The last printed line is

  samples_per_s=<x> mfu=<y|na>

With `stream_microbatches=True` (GradCache streamed from host memory) the step takes
the host batch every step, and the un-split step of the same global batch is timed
the same way (from the host), as is the streamed step without prefetch; the last line
gains `stream_overhead=<streamed time / un-split time> prefetch_saving=<1 - streamed
time / streamed time without prefetch>`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_flags(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    from jaxmedclip import config_lib  # Imports no jax: XLA_FLAGS can still be set after.

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="experiment file, e.g. experiments/x.py")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
    parser.add_argument(
        "--cpu_devices", type=int, default=None, help="fake CPU devices (sets XLA_FLAGS)"
    )
    parser.add_argument("--json", default=None,
                        help="append the result as one JSON line to this file")
    parser.add_argument("--label", default="jax", help="the result's `impl` in the JSON line")
    args, rest = parser.parse_known_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args, config_lib.override_flags(parser, rest)


def random_host_batch(config, seed: int = 0) -> dict:
    """A global batch (numpy, on the host) of the shapes `training.abstract_batch` gives."""
    import numpy as np

    from jaxmedclip import training

    rng = np.random.default_rng(seed)
    batch = {}
    for name, spec in training.abstract_batch(config).items():
        if name in ("tokens", "tokens2"):
            value = rng.integers(1, config.data.vocab_size, spec.shape)
        elif name in ("study_id", "text_id", "text_id2"):
            value = np.arange(spec.shape[0])  # All distinct: no multi-positive pairs.
        elif name in ("image", "image2") and np.issubdtype(spec.dtype, np.integer):
            value = rng.integers(0, np.iinfo(spec.dtype).max, spec.shape, endpoint=True)
        elif spec.dtype == np.bool_:
            value = (
                np.ones(spec.shape) if name in ("mask", "labels_present") else np.zeros(spec.shape)
            )
        else:
            value = rng.normal(size=spec.shape)
        batch[name] = value.astype(spec.dtype)
    return batch


def random_batch(config, mesh, seed: int = 0) -> dict:
    """`random_host_batch` sharded over the mesh like training's batches."""
    from jaxmedclip import parallel

    return parallel.host_to_global(random_host_batch(config, seed), mesh)


def time_steps(config, args, *, from_host: bool, prefetch: bool = True) -> dict:
    """(compile + first step) and steady-state seconds per step of `config`'s step.

    `from_host`: every step takes the numpy batch (the host-to-device copies are timed,
    as in training); else the batch is on the devices before timing starts."""
    import jax
    import numpy as np

    from jaxmedclip import training

    setup = training.build(config)
    if hasattr(setup.train_step, "prefetch"):
        setup.train_step.prefetch = prefetch
    state = training.initial_state(setup, config)
    host = random_host_batch(config)
    if from_host:
        step = setup.train_step.from_host
        batch = host
    else:
        step = setup.train_step
        batch = random_batch(config, setup.mesh)
    start = time.perf_counter()
    state, metrics = step(state, batch)  # Compiles.
    jax.block_until_ready((state, metrics))
    compile_s = time.perf_counter() - start
    for _ in range(args.warmup):
        state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - start) / args.steps
    synced = []  # Each step waited for: no overlap of dispatch with the previous step.
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        synced.append(time.perf_counter() - start)
    peak = None
    stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        peak = stats["peak_bytes_in_use"] / 1024**3
    else:  # CPU: the compiled programs' own account (training.compile_report).
        peak = training.compile_report(config, setup)["peak_gib_per_device"]
    return {"setup": setup, "compile_s": compile_s, "step_s": step_s,
            "median_step_s": float(np.median(synced)), "peak_gib": peak,
            "loss": float(metrics["loss"])}


def main(argv: list[str] | None = None) -> dict:
    sys.path.insert(0, REPO)
    args, overrides = parse_flags(sys.argv[1:] if argv is None else argv)
    from jaxmedclip import config_lib  # Imports no jax.

    if args.cpu_devices:
        config_lib.add_cpu_devices(args.cpu_devices)
    import jax

    from jaxmedclip import flops

    config = config_lib.config_from_flags(args.config, overrides)
    streamed = bool(config.stream_microbatches)
    run = time_steps(config, args, from_host=streamed)
    setup, step_s, compile_s = run["setup"], run["step_s"], run["compile_s"]
    metrics = {"loss": run["loss"]}
    extra = {}
    if streamed:  # Against the un-split step of the same global batch, copies timed alike.
        unsplit = config_lib.apply_overrides(
            config, ["microbatch_size=None", "stream_microbatches=False"])
        base = time_steps(unsplit, args, from_host=True)
        serial = time_steps(config, args, from_host=True, prefetch=False)
        extra = {
            "num_microbatches": setup.train_step.num_micro,
            "unsplit_step_time_s": base["step_s"],
            "unsplit_samples_per_s": config.global_batch_size / base["step_s"],
            "unsplit_peak_gib_per_device": base["peak_gib"],
            "no_prefetch_step_time_s": serial["step_s"],
            "stream_overhead": step_s / base["step_s"],
            "prefetch_saving": 1 - step_s / serial["step_s"],
        }

    device_kind = jax.devices()[0].device_kind
    tflops = flops.train_flops_per_step(config) / setup.mesh.size / 1e12 / step_s
    peak = flops.peak_tflops(device_kind)
    result = {
        "devices": f"{setup.mesh.size} x {device_kind}",
        "mesh": " ".join(f"{k}={v}" for k, v in setup.mesh.shape.items()),
        "global_batch_size": config.global_batch_size,
        "compile_and_first_step_s": compile_s,
        "step_time_s": step_s,
        "step_time_median_s": run["median_step_s"],
        "samples_per_s": config.global_batch_size / step_s,
        "tflops_per_device": tflops,
        "mfu": None if peak is None else tflops / peak,
        "peak_gib_per_device": run["peak_gib"],
        "loss": float(metrics["loss"]),
        **extra,
    }
    for key, value in result.items():
        shown = "na" if value is None else f"{value:.4g}" if isinstance(value, float) else value
        print(f"{key}: {shown}")
    mfu = "na" if result["mfu"] is None else f"{result['mfu']:.4f}"
    last = f"samples_per_s={result['samples_per_s']:.2f} mfu={mfu}"
    if streamed:
        last += (f" stream_overhead={result['stream_overhead']:.3f}"
                 f" prefetch_saving={result['prefetch_saving']:.3f}")
    print(last)
    if args.json:
        record = {"impl": args.label, "config": args.config, "overrides": overrides,
                  "jax": jax.__version__, **result}
        with open(args.json, "a") as f:
            f.write(json.dumps(record) + "\n")
    return result


if __name__ == "__main__":
    main()
