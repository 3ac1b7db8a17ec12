"""One process of the two-process ring-loss test, untiled and tiled (see test_losses.py).

  python tests/multiprocess_loss_worker.py PROCESS_ID PORT OUT_FILE

Two processes with four CPU devices each form one JAX cluster over gloo on localhost;
they build the global batch from `global_inputs`, run the ring loss (values and
gradients) on a data=8 mesh, and process 0 writes the results to OUT_FILE (.npz).
Importing this module has no effect beyond defining `global_inputs` and `CONFIGS`.
"""

import os
import sys

import numpy as np

GLOBAL_BATCH = 48
DIM = 16
NUM_LABELS = 6
SCALE = 20.0
BIAS = -4.0
CONFIGS = {
    "softmax": dict(name="softmax", impl="ring", targets="multi_positive",
                    multi_positive_key=("study_id", "text_id"), label_smoothing=0.1,
                    i2t_weight=0.3, t2i_weight=0.7),
    "sigmoid": dict(name="sigmoid", impl="ring", targets="soft_labels",
                    soft_target_temperature=0.3, label_smoothing=0.05),
    # In-device tiles: 6 rows per device, tiles of 4 (padded to 8) and of 6 (one tile).
    "softmax_tiled": dict(name="softmax", impl="ring", targets="soft_labels",
                          soft_target_temperature=0.3, label_smoothing=0.1, i2t_weight=0.3,
                          t2i_weight=0.7, tile_size=4),
    "sigmoid_tiled": dict(name="sigmoid", impl="ring", targets="multi_positive",
                          multi_positive_key=("study_id", "text_id"), label_smoothing=0.05,
                          tile_size=6),
}


def global_inputs(seed: int = 0):
    """The whole global batch as numpy arrays: (image_emb, text_emb, batch)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(GLOBAL_BATCH, DIM))
    text = image + rng.normal(size=(GLOBAL_BATCH, DIM))
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    labels = rng.integers(-1, 2, size=(GLOBAL_BATCH, NUM_LABELS)).astype(np.float32)
    labels[::5] = 0.0
    mask = np.ones(GLOBAL_BATCH, bool)
    mask[-5:] = False
    batch = {
        "mask": mask,
        "study_id": rng.integers(0, GLOBAL_BATCH // 3, GLOBAL_BATCH).astype(np.int32),
        "text_id": rng.integers(0, GLOBAL_BATCH // 2, GLOBAL_BATCH).astype(np.int32),
        "labels": labels,
    }
    return image.astype(np.float32), text.astype(np.float32), batch


def main(process_id: int, port: int, out_file: str) -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    import ml_collections
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from jaxmedclip import losses

    assert jax.device_count() == 8 and jax.local_device_count() == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rows = NamedSharding(mesh, P("data"))
    local = slice(process_id * GLOBAL_BATCH // 2, (process_id + 1) * GLOBAL_BATCH // 2)

    def to_global(value):
        value = np.asarray(value)
        return jax.make_array_from_process_local_data(rows, value[local], value.shape)

    image, text, batch = global_inputs()
    image, text = to_global(image), to_global(text)
    batch = {k: to_global(v) for k, v in batch.items()}
    results = {}
    for name, fields in CONFIGS.items():
        config = ml_collections.ConfigDict(fields)

        def loss_fn(image, text, scale, bias, batch, config=config):
            return losses.contrastive_loss(
                image, text, scale, bias, batch, config=config, mesh=mesh, batch_axes=("data",)
            )

        step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3), has_aux=True))
        (loss, metrics), grads = step(image, text, np.float32(SCALE), np.float32(BIAS), batch)
        results[f"{name}/loss"] = np.asarray(loss)
        for key, value in metrics.items():
            results[f"{name}/{key}"] = np.asarray(value)
        for key, grad in zip(("image", "text"), grads[:2], strict=True):
            results[f"{name}/grad_{key}"] = multihost_utils.process_allgather(grad, tiled=True)
        results[f"{name}/grad_scale"] = np.asarray(grads[2])
        results[f"{name}/grad_bias"] = np.asarray(grads[3])
    if process_id == 0:
        np.savez(out_file, **results)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
