"""One process of the two-process streamed-GradCache test (see test_stream.py).

  python tests/stream_worker.py PROCESS_ID PORT OUT_FILE

Two processes with four CPU devices each form one JAX cluster over gloo on localhost;
each holds its half of every global batch (`stream_setup.host_batches`) in host memory
and streams it; after the steps process 0 writes the parameters and losses to OUT_FILE.
"""

import os
import sys


def main(process_id: int, port: int, out_file: str) -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    import numpy as np
    from jax.experimental import multihost_utils

    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [here, os.path.dirname(here)]
    import stream_setup

    from jaxmedclip import training

    assert jax.device_count() == 8 and jax.local_device_count() == 4, jax.devices()
    config = stream_setup.small_config(stream=True)
    setup = training.build(config)
    state = training.initial_state(setup, config)
    half = config.global_batch_size // 2
    losses = []
    for batch in stream_setup.host_batches(config):
        local = {k: v[process_id * half:(process_id + 1) * half] for k, v in batch.items()}
        state, metrics = setup.train_step.from_host(state, local)
        losses.append(float(metrics["loss"]))
    params = multihost_utils.process_allgather(state.params, tiled=True)
    if process_id == 0:
        leaves = jax.tree_util.tree_flatten_with_path(params)[0]
        np.savez(out_file, losses=np.asarray(losses),
                 **{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves})


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
