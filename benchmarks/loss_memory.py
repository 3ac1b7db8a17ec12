"""Temporary memory per device and step time of the sharded contrastive losses.

  python benchmarks/loss_memory.py [--devices 8,16,32,64] [--local_batch 256] [--dim 512]
      [--global_batches 32768,131072,524288,1048576] [--tile 1024] [--time_tile 128]

Three parts, each in subprocesses with that many fake CPU devices
(`--xla_force_host_platform_device_count`, set before jax is imported):

1. Device-count sweep: forward + backward (gradients w.r.t. both embeddings and the
   scale) of each implementation on a data=N mesh at a fixed per-device batch; the
   compiled program's temporary memory per device
   (`compiled.memory_analysis().temp_size_in_bytes`) and one timed step.
2. Per-device-batch sweep on 8 devices, compile only: ring (untiled) and tiled ring
   (`--tile`), softmax and sigmoid, float32 embeddings, at each global batch.
3. The largest power-of-two global batch on 8 devices whose loss fits 1 GiB of
   temporary memory per device: dense / all_gather / ring / tiled ring (compile only).
4. Time of the tiled (`--time_tile`) against the untiled ring at global batch 4,096 on
   8 devices: forward + backward, measured alternately, median of `--repeats` (>= 5).

The last line printed is

  ring_memory_growth_8_to_64=<x> tiled_softmax_gib_1m=<a> tiled_sigmoid_gib_1m=<b>
  tiled_growth_per_2x_batch=<c>

(x: the ring's temporary memory at the largest device count / at the smallest; a, b: GiB
per device of the tiled losses at the largest global batch; c: the tiled losses' growth
per doubling of the batch over the sweep, the larger of the two). On a small CPU host all
fake devices share its cores: step times show the total work, not what one accelerator
per device would see.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30


def _setup(num_devices: int):
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    sys.path.insert(0, REPO)
    assert jax.device_count() == num_devices, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    return mesh, NamedSharding(mesh, P("data"))


def _step(mesh, fields: dict):
    import jax
    import ml_collections

    from jaxmedclip import losses

    config = ml_collections.ConfigDict(fields)

    def loss_fn(image, text, scale, bias):
        return losses.contrastive_loss(image, text, scale, bias, {}, config=config, mesh=mesh,
                                       batch_axes=("data",))[0]

    return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3)))


def measure_devices(num_devices: int, impls: list[str], local_batch: int, dim: int,
                    dtype: str, repeats: int) -> list[dict]:
    """Part 1, inside the subprocess that has `num_devices` fake CPU devices."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    mesh, rows = _setup(num_devices)
    global_batch = local_batch * num_devices
    rng = np.random.default_rng(0)

    def embeddings():
        emb = rng.normal(size=(global_batch, dim)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        return jax.device_put(jnp.asarray(emb, dtype), rows)

    args = (embeddings(), embeddings(), jnp.float32(10.0), jnp.float32(0.0))
    results = []
    for impl in impls:
        step = _step(mesh, dict(name="softmax", impl=impl))
        start = time.perf_counter()
        compiled = step.lower(*args).compile()
        compile_s = time.perf_counter() - start
        jax.block_until_ready(compiled(*args))  # Warm-up.
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - start)
        results.append({
            "devices": num_devices, "global_batch": global_batch, "impl": impl,
            "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
            "compile_s": compile_s, "step_s": min(times),
        })
    return results


def measure_batches(global_batches: list[int], dim: int, tile: int) -> list[dict]:
    """Part 2 (8 devices, compile only)."""
    import jax
    import jax.numpy as jnp

    mesh, rows = _setup(8)
    results = []
    for global_batch in global_batches:
        emb = jax.ShapeDtypeStruct((global_batch, dim), jnp.float32, sharding=rows)
        scalar = jax.ShapeDtypeStruct((), jnp.float32)
        for name in ("softmax", "sigmoid"):
            for label, tile_size in (("ring", 0), ("tiled", tile)):
                step = _step(mesh, dict(name=name, impl="ring", tile_size=tile_size))
                start = time.perf_counter()
                compiled = step.lower(emb, emb, scalar, scalar).compile()
                results.append({
                    "global_batch": global_batch, "loss": name, "impl": label,
                    "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
                    "compile_s": time.perf_counter() - start,
                })
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    return results


def measure_capacity(dim: int, tile: int, budget_gib: float) -> dict[str, int]:
    """Part 4 (8 devices, compile only): the largest power-of-two global batch whose
    softmax loss (forward + backward, float32) needs at most `budget_gib` of temporary
    memory per device, for each implementation."""
    import jax
    import jax.numpy as jnp

    mesh, rows = _setup(8)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    largest = {}
    for label, impl, tile_size in (("dense", "dense", 0), ("all_gather", "all_gather", 0),
                                   ("ring", "ring", 0), ("tiled", "ring", tile)):
        step = _step(mesh, dict(name="softmax", impl=impl, tile_size=tile_size))
        batch, fits = 1024, 0
        while batch <= 2**26:
            emb = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=rows)
            temp = step.lower(emb, emb, scalar, scalar).compile().memory_analysis()
            if temp.temp_size_in_bytes > budget_gib * GIB:
                break
            fits, batch = batch, 2 * batch
        largest[label] = fits
        print(json.dumps({label: fits}), file=sys.stderr, flush=True)
    return largest


def measure_time(global_batch: int, dim: int, tile: int, repeats: int) -> dict:
    """Part 3 (8 devices): untiled and tiled ring, alternately."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    mesh, rows = _setup(8)
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(2, global_batch, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=2, keepdims=True)
    args = (jax.device_put(emb[0], rows), jax.device_put(emb[1], rows), jnp.float32(10.0),
            jnp.float32(0.0))
    compiled = {label: _step(mesh, dict(name="softmax", impl="ring", tile_size=t)).lower(
        *args).compile() for label, t in (("ring", 0), ("tiled", tile))}
    times: dict[str, list[float]] = {label: [] for label in compiled}
    for label in compiled:
        jax.block_until_ready(compiled[label](*args))  # Warm-up.
    for _ in range(repeats):
        for label, fn in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(t) for label, t in times.items()}


def run_worker(num_devices: int, argv: list[str]):
    sys.path.insert(0, REPO)
    from jaxmedclip import config_lib  # Imports no jax.

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    config_lib.add_cpu_devices(num_devices, env)
    command = [sys.executable, os.path.abspath(__file__), "--worker", str(num_devices), *argv]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"benchmark worker ({num_devices} devices, {argv}) failed:\n"
                 f"{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="8,16,32,64", help="comma-separated counts")
    parser.add_argument("--impls", default="all_gather,ring",
                        help="implementations of the device sweep (dense too, at a cost)")
    parser.add_argument("--local_batch", type=int, default=256,
                        help="examples per device in the device sweep")
    parser.add_argument("--dim", type=int, default=512, help="embedding width")
    parser.add_argument("--dtype", default="float32", help="embedding dtype (device sweep)")
    parser.add_argument("--global_batches", default="32768,131072,524288,1048576",
                        help="global batches of the per-device-batch sweep (8 devices)")
    parser.add_argument("--tile", type=int, default=1024, help="tile of the batch sweep")
    parser.add_argument("--time_batch", type=int, default=4096,
                        help="global batch of the timing comparison (8 devices)")
    parser.add_argument("--time_tile", type=int, default=128,
                        help="tile of the timing comparison (smaller than the per-device "
                        "batch, so that the tile loop runs)")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps (median shown)")
    parser.add_argument("--part", default="devices,batches,time", help=argparse.SUPPRESS)
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.part == "devices":
            out = measure_devices(args.worker, args.impls.split(","), args.local_batch,
                                  args.dim, args.dtype, 1)
        elif args.part == "capacity":
            out = measure_capacity(args.dim, args.tile, 1.0)
        elif args.part == "batches":
            out = measure_batches([int(b) for b in args.global_batches.split(",")], args.dim,
                                  args.tile)
        else:
            out = measure_time(args.time_batch, args.dim, args.time_tile, args.repeats)
        print(json.dumps(out))
        return
    common = ["--dim", str(args.dim), "--impls", args.impls, "--local_batch",
              str(args.local_batch), "--dtype", args.dtype, "--global_batches",
              args.global_batches, "--tile", str(args.tile), "--time_batch",
              str(args.time_batch), "--time_tile", str(args.time_tile), "--repeats",
              str(args.repeats)]

    counts = sorted(int(n) for n in args.devices.split(","))
    print(f"1. softmax loss, forward+backward, local batch {args.local_batch}, dim {args.dim}, "
          f"{args.dtype}, fake CPU devices")
    print("| devices | global batch | impl | temp MiB / device | step s | compile s |")
    print("|---:|---:|---|---:|---:|---:|")
    peak: dict[tuple[str, int], int] = {}
    for count in counts:
        for row in run_worker(count, common + ["--part", "devices"]):
            peak[row["impl"], count] = row["temp_bytes"]
            print(f"| {count} | {row['global_batch']} | {row['impl']} | "
                  f"{row['temp_bytes'] / 2**20:.2f} | {row['step_s']:.2f} | "
                  f"{row['compile_s']:.1f} |", flush=True)
    low, high = counts[0], counts[-1]
    ring_growth = peak["ring", high] / peak["ring", low]

    print(f"\n2. forward+backward on 8 devices, dim {args.dim}, float32, compile only; "
          f"tiled = ring with tile_size={args.tile}")
    print("| global batch | per device | loss | ring GiB / device | tiled GiB / device |")
    print("|---:|---:|---|---:|---:|")
    rows = run_worker(8, common + ["--part", "batches"])
    temp = {(r["global_batch"], r["loss"], r["impl"]): r["temp_bytes"] for r in rows}
    batches = sorted({r["global_batch"] for r in rows})
    for batch in batches:
        for name in ("softmax", "sigmoid"):
            print(f"| {batch:,} | {batch // 8:,} | {name} | "
                  f"{temp[batch, name, 'ring'] / GIB:.3f} | "
                  f"{temp[batch, name, 'tiled'] / GIB:.3f} |", flush=True)
    doublings = math.log2(batches[-1] / batches[0])
    growth = max((temp[batches[-1], n, "tiled"] / temp[batches[0], n, "tiled"])
                 ** (1 / doublings) for n in ("softmax", "sigmoid"))

    largest = run_worker(8, common + ["--part", "capacity"])
    print(f"\n3. largest power-of-two global batch on 8 devices per 1 GiB of loss memory per "
          f"device (softmax, forward+backward, dim {args.dim}, float32, compile only)")
    print("| " + " | ".join(largest) + " |")
    print("|" + "---:|" * len(largest))
    print("| " + " | ".join(f"{b:,}" for b in largest.values()) + " |", flush=True)

    times = run_worker(8, common + ["--part", "time"])
    print(f"\n4. softmax forward+backward at global batch {args.time_batch} on 8 devices, "
          f"median of {args.repeats} (alternating): ring {times['ring']:.3f} s, tiled "
          f"(tile {args.time_tile}) {times['tiled']:.3f} s, ratio "
          f"{times['tiled'] / times['ring']:.2f}")
    last = batches[-1]
    tag = f"{last // 2**20}m" if last % 2**20 == 0 else str(last)
    print(f"ring_memory_growth_{low}_to_{high}={ring_growth:.3f} "
          f"tiled_softmax_gib_{tag}={temp[last, 'softmax', 'tiled'] / GIB:.3f} "
          f"tiled_sigmoid_gib_{tag}={temp[last, 'sigmoid', 'tiled'] / GIB:.3f} "
          f"tiled_growth_per_2x_batch={growth:.3f}")


if __name__ == "__main__":
    main()
