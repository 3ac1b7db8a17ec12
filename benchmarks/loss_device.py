"""The contrastive loss on one accelerator: peak device memory and time, tiled vs untiled.

  python benchmarks/loss_device.py [--batch 65536] [--dim 512] [--dtype bfloat16]
      [--tile 2048] [--untiled_batches 4096,8192,16384,32768,65536] [--repeats 7]

Each measurement runs in its own process, so the device's peak-memory counter
(`memory_stats()["peak_bytes_in_use"]`) covers that loss alone: forward + backward
(gradients w.r.t. both embeddings and the scale) of the softmax loss on one device (no
mesh: the ring code with a single block; `loss.tile_size` tiles it), after the inputs
are on the device, minus the inputs' bytes. Times are the median of `--repeats` steps
after a warm-up. The untiled loss is measured at each of `--untiled_batches` until one
does not fit. The last line printed is

  tiled_peak_gib=<a> tiled_ms=<b> untiled_largest_batch=<n> untiled_ms_at_largest=<c>
  tiled_ms_at_that_batch=<d>

Needs a GPU or TPU for the memory figures: on CPU `memory_stats()` is unavailable and
the compiled program's temporary bytes are reported instead (marked "compiled").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30


def measure(batch: int, dim: int, dtype: str, tile: int, repeats: int) -> dict:
    """One loss in this process: peak memory above the inputs, and step time."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, REPO)
    from jaxmedclip import losses

    device = jax.local_devices()[0]
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(2, batch, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=2, keepdims=True)
    image, text = (jax.device_put(jnp.asarray(e, dtype), device) for e in emb)
    scale = jax.device_put(jnp.float32(10.0), device)
    spec = losses.LossSpec(impl="ring", tile_size=tile)

    def loss_fn(image, text, scale):
        return losses.contrastive_loss(image, text, scale, None, {}, config=spec, mesh=None,
                                       batch_axes="data")[0]

    step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2)))
    compiled = step.lower(image, text, scale).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    stats = device.memory_stats()
    before = stats["bytes_in_use"] if stats else 0
    try:
        jax.block_until_ready(compiled(image, text, scale))  # Warm-up.
    except Exception as e:  # noqa: BLE001 - out of memory is the answer here.
        if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
            return {"batch": batch, "tile": tile, "fits": False}
        raise
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(image, text, scale))
        times.append(time.perf_counter() - start)
    stats = device.memory_stats()
    peak = (stats["peak_bytes_in_use"] - before) if stats else temp
    return {"batch": batch, "tile": tile, "fits": True, "device": device.device_kind,
            "peak_bytes": int(peak), "measured": "memory_stats" if stats else "compiled",
            "compiled_temp_bytes": int(temp), "ms": 1e3 * statistics.median(times)}


def run(batch: int, tile: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--batch", str(batch),
               "--tile", str(tile), "--dim", str(args.dim), "--dtype", args.dtype,
               "--repeats", str(args.repeats)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        if "RESOURCE_EXHAUSTED" in done.stderr or "out of memory" in done.stderr.lower():
            return {"batch": batch, "tile": tile, "fits": False}
        sys.exit(f"worker (batch {batch}, tile {tile}) failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=65536, help="batch of the tiled loss")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16", help="embedding dtype")
    parser.add_argument("--tile", type=int, default=2048)
    parser.add_argument("--untiled_batches", default="4096,8192,16384,32768,65536")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.batch, args.dim, args.dtype, args.tile, args.repeats)))
        return

    print(f"softmax loss, forward + backward, one device, dim {args.dim}, {args.dtype}")
    print("| batch | tile | fits | peak GiB above inputs | measured by | ms |")
    print("|---:|---:|---|---:|---|---:|")

    def show(row):
        if not row["fits"]:
            print(f"| {row['batch']:,} | {row['tile'] or '-'} | no | | | |", flush=True)
            return
        print(f"| {row['batch']:,} | {row['tile'] or '-'} | yes | "
              f"{row['peak_bytes'] / GIB:.3f} | {row['measured']} | {row['ms']:.1f} |",
              flush=True)

    tiled = run(args.batch, args.tile, args)
    show(tiled)
    largest = None
    for batch in sorted(int(b) for b in args.untiled_batches.split(",")):
        row = run(batch, 0, args)
        show(row)
        if not row["fits"]:
            break
        largest = row
    if largest is None:
        sys.exit("the untiled loss fits at none of --untiled_batches")
    same = run(largest["batch"], args.tile, args)
    show(same)
    print(f"tiled_peak_gib={tiled['peak_bytes'] / GIB:.3f} tiled_ms={tiled['ms']:.1f} "
          f"untiled_largest_batch={largest['batch']} untiled_ms_at_largest={largest['ms']:.1f} "
          f"tiled_ms_at_that_batch={same['ms']:.1f}")


if __name__ == "__main__":
    main()
