"""Peak temporary memory per device and step time of the sharded contrastive losses.

  python benchmarks/loss_memory.py [--devices 8,16,32,64] [--local_batch 256] [--dim 512]

For each device count a subprocess with that many fake CPU devices
(`--xla_force_host_platform_device_count`, set before jax is imported) compiles
forward+backward (gradients w.r.t. both embeddings and the scale) of each implementation
on a data=N mesh at a fixed per-device batch, reads the compiled program's temporary
memory per device (`compiled.memory_analysis().temp_size_in_bytes`) and times steps.
The last line printed is

  ring_memory_growth_8_to_64=<x> all_gather_memory_growth_8_to_64=<y>

(peak memory at the largest device count / at the smallest). On a small CPU host all
fake devices share its cores: the step times show the total work (which grows with the
square of the global batch), not what one accelerator per device would see.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(num_devices: int, impls: list[str], local_batch: int, dim: int, dtype: str,
            repeats: int) -> list[dict]:
    """Runs inside the subprocess that has `num_devices` fake CPU devices."""
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    sys.path.insert(0, REPO)
    from jaxmedclip import losses

    assert jax.device_count() == num_devices, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rows = NamedSharding(mesh, P("data"))
    global_batch = local_batch * num_devices
    rng = np.random.default_rng(0)

    def embeddings():
        emb = rng.normal(size=(global_batch, dim)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        return jax.device_put(jnp.asarray(emb, dtype), rows)

    image, text, scale = embeddings(), embeddings(), jnp.float32(10.0)
    results = []
    for impl in impls:
        config = ml_collections.ConfigDict(dict(name="softmax", impl=impl))

        def loss_fn(image, text, scale, config=config):
            return losses.contrastive_loss(
                image, text, scale, None, {}, config=config, mesh=mesh, batch_axes=("data",)
            )[0]

        step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2)))
        start = time.perf_counter()
        compiled = step.lower(image, text, scale).compile()
        compile_s = time.perf_counter() - start
        memory = compiled.memory_analysis()
        jax.block_until_ready(compiled(image, text, scale))  # Warm-up.
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(image, text, scale))
            times.append(time.perf_counter() - start)
        results.append({
            "devices": num_devices,
            "global_batch": global_batch,
            "impl": impl,
            "temp_bytes": int(memory.temp_size_in_bytes),
            "argument_bytes": int(memory.argument_size_in_bytes),
            "compile_s": compile_s,
            "step_s": min(times),
        })
    return results


def run_subprocess(num_devices: int, args: argparse.Namespace) -> list[dict]:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={num_devices}"
    ).strip()
    command = [
        sys.executable, os.path.abspath(__file__), "--worker", str(num_devices),
        "--impls", args.impls, "--local_batch", str(args.local_batch), "--dim", str(args.dim),
        "--dtype", args.dtype, "--repeats", str(args.repeats),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"benchmark for {num_devices} devices failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="8,16,32,64", help="comma-separated counts")
    parser.add_argument("--impls", default="all_gather,ring",
                        help="comma-separated implementations (dense too, at a cost)")
    parser.add_argument("--local_batch", type=int, default=256, help="examples per device")
    parser.add_argument("--dim", type=int, default=512, help="embedding width")
    parser.add_argument("--dtype", default="float32", help="embedding dtype")
    parser.add_argument("--repeats", type=int, default=1, help="timed steps (min is shown)")
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    impls = args.impls.split(",")
    if args.worker:
        print(json.dumps(measure(args.worker, impls, args.local_batch, args.dim, args.dtype,
                                 args.repeats)))
        return

    counts = sorted(int(n) for n in args.devices.split(","))
    print(f"softmax loss, forward+backward, local batch {args.local_batch}, dim {args.dim}, "
          f"{args.dtype}, fake CPU devices")
    print("| devices | global batch | impl | temp MiB / device | step s | compile s |")
    print("|---:|---:|---|---:|---:|---:|")
    peak: dict[tuple[str, int], int] = {}
    for count in counts:
        for row in run_subprocess(count, args):
            peak[row["impl"], count] = row["temp_bytes"]
            print(f"| {count} | {row['global_batch']} | {row['impl']} | "
                  f"{row['temp_bytes'] / 2**20:.2f} | {row['step_s']:.2f} | "
                  f"{row['compile_s']:.1f} |", flush=True)
    low, high = counts[0], counts[-1]
    print(" ".join(
        f"{impl}_memory_growth_{low}_to_{high}={peak[impl, high] / peak[impl, low]:.3f}"
        for impl in ("ring", "all_gather") if impl in impls
    ))


if __name__ == "__main__":
    main()
