"""Steady-state speed of the train step of a config, on synthetic batches (no dataset).

  python benchmarks/train_step.py --config experiments/tiny_synthetic.py \
      [--config.global_batch_size=128 ...] [--steps 20] [--warmup 3] [--cpu_devices 8]

Builds the mesh, model, optimizer and jitted train step exactly as `jaxmedclip.train`
does, creates random batches of the config's shapes (images, token ids, labels) on the
mesh, compiles, runs `--warmup` steps, then times `--steps` steps (one
`block_until_ready` at the end, so dispatch overlaps compute as in training; the input
pipeline is not included). Prints samples/s, step time, analytic TFLOPs per device
(`jaxmedclip/flops.py`) and MFU where the chip's peak is known; the last line is

  samples_per_s=<x> mfu=<y|na>
"""

from __future__ import annotations

import argparse
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
    args, rest = parser.parse_known_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args, config_lib.override_flags(parser, rest)


def random_batch(config, mesh, seed: int = 0) -> dict:
    """A global batch of the shapes `training.abstract_batch` describes, sharded like training."""
    import jax
    import numpy as np

    from jaxmedclip import parallel, training

    rng = np.random.default_rng(seed)
    batch = {}
    for name, spec in training.abstract_batch(config).items():
        if name == "tokens":
            value = rng.integers(1, config.data.vocab_size, spec.shape)
        elif name in ("study_id", "text_id"):
            value = np.arange(spec.shape[0])  # All distinct: no multi-positive pairs.
        elif spec.dtype == np.bool_:
            value = (
                np.ones(spec.shape) if name in ("mask", "labels_present") else np.zeros(spec.shape)
            )
        else:
            value = rng.normal(size=spec.shape)
        batch[name] = jax.device_put(value.astype(spec.dtype), parallel.batch_sharding(mesh))
    return batch


def main(argv: list[str] | None = None) -> dict:
    sys.path.insert(0, REPO)
    args, overrides = parse_flags(sys.argv[1:] if argv is None else argv)
    if args.cpu_devices:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={args.cpu_devices}"
        ).strip()
    import jax

    from jaxmedclip import config_lib, flops, training

    config = config_lib.config_from_flags(args.config, overrides)
    setup = training.build(config)
    state = training.initial_state(setup, config)
    batch = random_batch(config, setup.mesh)

    start = time.perf_counter()
    state, metrics = setup.train_step(state, batch)  # Compiles.
    jax.block_until_ready((state, metrics))
    compile_s = time.perf_counter() - start
    for _ in range(args.warmup):
        state, metrics = setup.train_step(state, batch)
    jax.block_until_ready((state, metrics))

    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = setup.train_step(state, batch)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - start) / args.steps

    device_kind = jax.devices()[0].device_kind
    tflops = flops.train_flops_per_step(config) / setup.mesh.size / 1e12 / step_s
    peak = flops.peak_tflops(device_kind)
    result = {
        "devices": f"{setup.mesh.size} x {device_kind}",
        "mesh": " ".join(f"{k}={v}" for k, v in setup.mesh.shape.items()),
        "global_batch_size": config.global_batch_size,
        "compile_and_first_step_s": compile_s,
        "step_time_s": step_s,
        "samples_per_s": config.global_batch_size / step_s,
        "tflops_per_device": tflops,
        "mfu": None if peak is None else tflops / peak,
        "loss": float(metrics["loss"]),
    }
    for key, value in result.items():
        shown = "na" if value is None else f"{value:.4g}" if isinstance(value, float) else value
        print(f"{key}: {shown}")
    mfu = "na" if result["mfu"] is None else f"{result['mfu']:.4f}"
    print(f"samples_per_s={result['samples_per_s']:.2f} mfu={mfu}")
    return result


if __name__ == "__main__":
    main()
