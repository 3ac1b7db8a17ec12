"""Device mesh, logical-axis rules, and moving host batches onto the mesh.

Parameters and activations carry logical axis names; one table of rules maps them to the
mesh axes `data`, `fsdp` and `tensor`. Changing the parallelism is changing the mesh sizes
in the config (and, for unusual layouts, `config.logical_axis_rules`), not the model.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (logical name, mesh axes). Weights are sharded over `fsdp` along `embed` (fully sharded
# data parallel) and over `tensor` along `mlp`/`heads`/`vocab` (tensor parallel); the batch
# dimension of activations over both batch axes.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("activation_batch", BATCH_AXES),
    ("activation_seq", None),
    ("activation_embed", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("proj", None),
    ("seq", None),
    ("layers", None),
    ("channels", None),
    ("conv_height", None),
    ("conv_width", None),
)


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
    """Resolves the axis sizes of `mesh_config` (one may be -1: fill the remaining devices)."""
    sizes = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
    unknown = [axis for axis, size in zip(MESH_AXES, sizes, strict=True) if size == -1]
    if len(unknown) > 1:
        raise ValueError(f"only one mesh axis may be -1; got {unknown} in mesh={dict(mesh_config)}")
    if any(size == 0 or size < -1 for size in sizes):
        raise ValueError(f"mesh axis sizes must be positive or -1; got mesh={dict(mesh_config)}")
    known = math.prod(size for size in sizes if size != -1)
    if unknown:
        if num_devices % known:
            raise ValueError(
                f"mesh={dict(mesh_config)}: the fixed axes use {known} devices, which does not "
                f"divide the {num_devices} devices available"
            )
        sizes[MESH_AXES.index(unknown[0])] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh={dict(mesh_config)} needs {math.prod(sizes)} devices but {num_devices} are "
            f"available; set one axis to -1 to fill"
        )
    return tuple(sizes)


def make_mesh(mesh_config: ml_collections.ConfigDict, devices: Sequence | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    try:
        device_array = mesh_utils.create_device_mesh(shape, devices)
    except (AssertionError, ValueError, NotImplementedError):
        device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_rules(config: ml_collections.ConfigDict) -> tuple:
    """The config's logical-axis rules (`config.logical_axis_rules`) or the defaults."""
    rules = config.logical_axis_rules
    if rules is None:
        return DEFAULT_RULES
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def batch_shards(mesh: Mesh) -> int:
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
    """Fails early when the global batch does not split over devices and processes."""
    shards = batch_shards(mesh)
    if global_batch_size % shards:
        fits = shards * max(1, round(global_batch_size / shards))
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by the {shards} devices of "
            f"the batch axes {BATCH_AXES} (mesh {dict(mesh.shape)}); e.g. {fits} would fit"
        )
    if global_batch_size % jax.process_count():
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by the "
            f"{jax.process_count()} processes"
        )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension over the batch axes, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def host_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Turns this process's share of the batch into global arrays sharded over the mesh.

    Non-numeric fields (texts kept for evaluation) stay on the host and are dropped here.
    """
    sharding = batch_sharding(mesh)
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.dtype.kind in "OSU":
            continue
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out


def prefetch_to_device(host_batches: Iterable[Mapping[str, np.ndarray]], mesh: Mesh,
                       depth: int = 2) -> Iterator[dict[str, jax.Array]]:
    """`host_to_global` of each batch, issued `depth` batches ahead of the one yielded.

    The copies are asynchronous: while the step on batch k runs, batches k + 1 .. k + depth
    are already on their way to the devices (or there), so a step never waits for its
    input's transfer when the host keeps up.
    """
    if depth < 1:
        raise ValueError(f"prefetch depth must be >= 1; got {depth}")
    queue: collections.deque = collections.deque()
    for batch in host_batches:
        queue.append(host_to_global(batch, mesh))
        if len(queue) > depth:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    auto: bool = False,
) -> None:
    """Joins this process to a multi-process JAX cluster.

    Explicit: all three arguments given (local rehearsal, bare-metal clusters); on CPU the
    collectives run over gloo. `auto`: `jax.distributed.initialize()` discovers the
    cluster itself (TPU pod slices, SLURM). Neither: a single process.
    """
    explicit = (coordinator_address, num_processes, process_id)
    if any(x is not None for x in explicit):
        if any(x is None for x in explicit):
            raise ValueError(
                "--coordinator_address, --num_processes and --process_id go together; got "
                f"{coordinator_address!r}, {num_processes!r}, {process_id!r}"
            )
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id {process_id} must be in [0, {num_processes})")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif auto:
        jax.distributed.initialize()
