"""The tiled ring loss (`loss.tile_size`) against a float64 numpy transcription of the
documented semantics: values, metrics and gradients w.r.t. both embeddings, the scale and
the bias, for every loss x target kind x masks, on one device (no mesh and a one-device
mesh) and on eight, with tiles that divide the per-device batch, tiles that do not
(padding), tiles of fewer than 8 rows, and tile = per-device batch. Also: bfloat16
embeddings and matmuls, and the compiled program's buffers at a per-device batch of 8,192.
The two-process form is in test_losses.py (`test_ring_across_two_processes`).
"""

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from loss_reference import (
    LOSS_TARGETS,
    TOL,
    assert_matches_reference,
    loss_config,
    make_inputs,
    make_mesh,
    numpy_reference_grads,
    per_side_inputs,
    run_loss,
)

from jaxmedclip import losses

# (mesh, tile): global batch 32, so the per-device batch is 32 (none / single), 4
# (data8) or 4 (data4_fsdp2, batch over both axes).
PLACEMENTS = [
    (None, 5),  # One device without a mesh; 32 rows padded to 35.
    ("single", 32),  # Tile = per-device batch: one tile, the untiled ring step.
    ("data8", 3),  # Fewer than 8 rows, not dividing 4: padded to 6.
    ("data4_fsdp2", 2),
    ("data8", 4),  # Tile = per-device batch on 8 devices.
    ("single", 8),
]
MASKS = ("padding", "per_side")
COMBOS = list(itertools.product(LOSS_TARGETS, MASKS))
DEFAULT_CASES = [
    (name, targets, masks, *PLACEMENTS[i % len(PLACEMENTS)])
    for i, ((name, targets), masks) in enumerate(COMBOS)
]
SLOW_CASES = [
    (name, targets, masks, mesh, tile)
    for ((name, targets), masks), (mesh, tile) in itertools.product(COMBOS, PLACEMENTS)
    if (name, targets, masks, mesh, tile) not in DEFAULT_CASES
]


def check_tiled(name, targets, masks, mesh_name, tile):
    image, text, batch = per_side_inputs() if masks == "per_side" else make_inputs()
    config = loss_config(name, targets, "ring", tile_size=tile)
    mesh = make_mesh(mesh_name) if mesh_name else None
    got = run_loss(config, image, text, batch, 10.0, -5.0, mesh=mesh,
                   batch_axes=mesh.axis_names if mesh else ("data",))
    assert_matches_reference(got, image, text, batch, config)
    grads = got[2]
    want_grads = numpy_reference_grads(image, text, 10.0, -5.0, batch, config)
    for what, want, got in zip(("image", "text", "scale", "bias"), want_grads, grads,
                               strict=True):
        np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL, err_msg=f"grad {what}")


@pytest.mark.parametrize("name,targets,masks,mesh_name,tile", DEFAULT_CASES)
def test_tiled_matches_float64_reference(name, targets, masks, mesh_name, tile):
    check_tiled(name, targets, masks, mesh_name, tile)


@pytest.mark.slow
@pytest.mark.parametrize("name,targets,masks,mesh_name,tile", SLOW_CASES)
def test_tiled_matches_float64_reference_full_sweep(name, targets, masks, mesh_name, tile):
    check_tiled(name, targets, masks, mesh_name, tile)


@pytest.mark.parametrize("name", losses.LOSSES)
def test_numpy_gradient_reference_matches_autodiff_of_dense(name):
    """The float64 gradient transcription against jax autodiff of the dense loss."""
    image, text, batch = per_side_inputs()
    config = loss_config(name, "soft_labels")
    _, _, grads = run_loss(config, image, text, batch, 10.0, -5.0)
    want = numpy_reference_grads(image, text, 10.0, -5.0, batch, config)
    for what, w, g in zip(("image", "text", "scale", "bias"), want, grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=TOL, atol=TOL, err_msg=what)


def cosine(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("matmul_inputs", losses.MATMUL_INPUTS)
@pytest.mark.parametrize("name", losses.LOSSES)
def test_bfloat16_close_to_float32(name, matmul_inputs):
    """bfloat16 embeddings (and bfloat16 tile matmuls): loss within 1e-2 of float32,
    gradients with cosine >= 0.9999."""
    image, text, batch = make_inputs(global_batch=64, dim=32)
    mesh = make_mesh("data8")
    f32 = run_loss(loss_config(name, "multi_positive", "ring", tile_size=4), image, text,
                   batch, 10.0, -5.0, mesh=mesh)
    config = loss_config(name, "multi_positive", "ring", tile_size=4,
                         matmul_inputs=matmul_inputs)
    b16 = run_loss(config, jnp.asarray(image, jnp.bfloat16), jnp.asarray(text, jnp.bfloat16),
                   batch, 10.0, -5.0, mesh=mesh)
    assert abs(float(b16[0]) - float(f32[0])) <= 1e-2
    for what, want, got in zip(("image", "text", "scale", "bias"), f32[2], b16[2],
                               strict=True):
        if name == "softmax" and what == "bias":
            continue  # Zero both ways.
        if np.ndim(want):
            assert cosine(got, want) >= 0.9999, what
        else:
            np.testing.assert_allclose(got, want, rtol=1e-2, err_msg=what)


def test_compiled_tiled_loss_holds_no_batch_squared_buffer():
    """At a per-device batch of 8,192 on 8 devices (global 65,536) no buffer of the
    compiled forward + backward has two dimensions of the batch's size, and temporary
    memory is within a bound linear in the per-device batch."""
    local, dim, tile, devices = 8192, 64, 512, 8
    mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
    rows = NamedSharding(mesh, P("data"))
    emb = jax.ShapeDtypeStruct((local * devices, dim), jnp.float32, sharding=rows)
    flags = jax.ShapeDtypeStruct((local * devices,), jnp.bool_, sharding=rows)
    config = loss_config("softmax", "multi_positive", "ring", tile_size=tile,
                         multi_positive_key="study_id")

    def loss_fn(image, text, scale, mask, study_id):
        return losses.contrastive_loss(image, text, scale, None,
                                       {"mask": mask, "study_id": study_id}, config=config,
                                       mesh=mesh, batch_axes=("data",))[0]

    ids = jax.ShapeDtypeStruct((local * devices,), jnp.int32, sharding=rows)
    compiled = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2))).lower(
        emb, emb, jax.ShapeDtypeStruct((), jnp.float32), flags, ids).compile()
    shapes = {tuple(int(d) for d in dims.split(","))
              for dims in re.findall(r"\[(\d+(?:,\d+)+)\]", compiled.as_text())}
    big = [s for s in shapes if sum(d >= 2 * tile for d in s) >= 2]
    assert not big, f"buffers with two batch-sized dimensions: {big}"
    assert any(s[:2] == (tile, tile) for s in shapes), "expected [tile, tile] logit tiles"
    temp = compiled.memory_analysis().temp_size_in_bytes
    # A few [local, dim] float32 buffers (the visiting block and the travelling gradient,
    # double-buffered) plus a few [tile, tile] tiles; [local, local] would be 256 MiB.
    bound = 12 * local * dim * 4 + 16 * tile * tile * 4 + (1 << 20)
    assert temp <= bound, (temp, bound)


def test_tile_config_errors():
    image, text, batch = make_inputs()
    for impl in ("all_gather", "dense"):
        with pytest.raises(ValueError, match=rf"loss.tile_size=8 tiles the ring loss, and "
                                             rf"loss.impl='{impl}' is never tiled"):
            run_loss(loss_config("softmax", "one_hot", impl, tile_size=8), image, text, batch,
                     10.0, 0.0)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match=r"loss.tile_size=.* must be (an integer >= 0|int)"):
            losses.LossSpec.from_config({"impl": "ring", "tile_size": bad})
    with pytest.raises(ValueError, match=r"loss.matmul_inputs='float16' is unknown"):
        losses.LossSpec.from_config({"matmul_inputs": "float16"})
    assert losses.LossSpec.from_config({"impl": "ring", "tile_size": None}).tile_size == 0
