"""The sharded contrastive losses against the dense reference (values and gradients).

The dense loss is itself checked against a float64 numpy transcription of the semantics
in the `jaxmedclip.losses` docstring. Needs the 8 fake CPU devices of conftest.py.
"""

import itertools
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmedclip import losses

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS_DIR)
import multiprocess_loss_worker  # noqa: E402
from loss_reference import (  # noqa: E402
    LOSS_TARGETS,
    MESHES,
    NEAR_TIE_ACCURACY_TOL,
    SHARDED,
    TOL,
    assert_matches_reference,
    assert_same,
    check_against_dense,
    dense_result,
    loss_config,
    make_inputs,
    make_mesh,
    numpy_reference,
    numpy_reference_grads,
    per_side_inputs,
    reference_targets,
    run_loss,
    valid_sides,
)
from two_processes import run_two_processes  # noqa: E402


@pytest.mark.parametrize("name,targets", LOSS_TARGETS)
def test_dense_matches_numpy_reference(name, targets):
    image, text, batch = make_inputs()
    config = loss_config(name, targets)
    want_loss, want_metrics = numpy_reference(image, text, 10.0, -5.0, batch, config)
    loss, metrics, _ = dense_result(name, targets)
    np.testing.assert_allclose(loss, want_loss, rtol=TOL, atol=TOL)
    for key, want in want_metrics.items():
        np.testing.assert_allclose(metrics[key], want, rtol=TOL, atol=TOL, err_msg=key)


def test_soft_targets_of_unlabelled_examples_are_one_hot():
    image, text, batch = make_inputs()
    batch["labels"] = np.zeros_like(batch["labels"])
    soft = run_loss(loss_config("softmax", "soft_labels"), image, text, batch, 10.0, 0.0)
    one_hot = run_loss(loss_config("softmax", "one_hot"), image, text, batch, 10.0, 0.0)
    assert_same(one_hot, soft)


def test_multi_positive_with_unique_ids_is_one_hot():
    image, text, batch = make_inputs()
    batch["study_id"] = np.arange(len(image), dtype=np.int32)
    config = loss_config("softmax", "multi_positive", multi_positive_key="study_id")
    multi = run_loss(config, image, text, batch, 10.0, 0.0)
    assert_same(run_loss(loss_config("softmax", "one_hot"), image, text, batch, 10.0, 0.0), multi)


@pytest.mark.parametrize("impl", ("dense",) + SHARDED)
def test_no_finding_key_makes_normal_examples_positives(impl):
    """The "no_finding" key equals an explicit id field that is shared by the examples
    labelled "No Finding" and unique otherwise, on every implementation."""
    image, text, batch = make_inputs(num_labels=14)
    no_finding = losses.CHEXPERT_FINDINGS.index("No Finding")
    batch["labels"][:, no_finding] = 0.0
    batch["labels"][[0, 2, 9, 11, 20, 27], no_finding] = 1.0  # 20 and 27 across devices.
    mesh = make_mesh("data8") if impl != "dense" else None
    axes = ("data",)
    config = loss_config("softmax", "multi_positive", impl, multi_positive_key="text_id,no_finding")
    got = run_loss(config, image, text, batch, 10.0, 0.0, mesh=mesh, batch_axes=axes)
    explicit = dict(batch)
    explicit["study_id"] = np.where(batch["labels"][:, no_finding] == 1, 10_000,
                                    np.arange(len(image))).astype(np.int32)
    want = run_loss(loss_config("softmax", "multi_positive", "dense"), image, text, explicit,
                    10.0, 0.0)
    assert_same(want, got)
    # And it changes the loss: normal examples 0 and 2 are no longer negatives.
    plain = run_loss(loss_config("softmax", "multi_positive", "dense",
                                 multi_positive_key="text_id"), image, text, batch, 10.0, 0.0)
    assert abs(float(plain[0]) - float(got[0])) > 1e-3


def test_no_finding_key_needs_labels():
    image, text, batch = make_inputs()
    del batch["labels"]
    config = loss_config("softmax", "multi_positive", multi_positive_key="no_finding")
    with pytest.raises(ValueError, match="labels"):
        run_loss(config, image, text, batch, 10.0, 0.0)


def test_old_config_and_missing_batch_fields_use_defaults():
    image, text, batch = make_inputs()
    config = ml_collections.ConfigDict(dict(name="softmax", impl="all_gather"))
    loss, metrics, _ = run_loss(config, image, text, {}, 10.0, 0.0, mesh=make_mesh("data8"))
    ones = {"mask": np.ones(len(image), bool)}
    want = run_loss(loss_config("softmax", "one_hot", label_smoothing=0.0, i2t_weight=0.5,
                                t2i_weight=0.5), image, text, ones, 10.0, 0.0)
    np.testing.assert_allclose(loss, want[0], rtol=TOL, atol=TOL)


# ----------------------------------------------------------------------------------------
# Per-side validity (`image_mask`, `text_mask`): a text without its image and the reverse.


def selection_reference_loss(image, text, scale, bias, batch, config):
    """The loss as a plain function of the valid images and valid texts alone (the
    others deleted, not masked), in jnp for its gradients."""
    images, texts = (np.flatnonzero(v) for v in valid_sides(batch))
    affinity = jnp.asarray(reference_targets(batch, config)[0][np.ix_(images, texts)],
                           jnp.float32)
    logits = scale * image[images] @ text[texts].T
    eps = config.label_smoothing
    if config.name == "sigmoid":
        logits = logits + bias
        target = (1 - eps) * affinity + eps / 2
        pairs = -(target * jax.nn.log_sigmoid(logits)
                  + (1 - target) * jax.nn.log_sigmoid(-logits))
        return jnp.sum(pairs) / ((len(images) + len(texts)) / 2)

    def direction(logits, affinity):
        mass = np.asarray(affinity.sum(axis=1))
        kept = np.flatnonzero(mass > 0)
        target = (1 - eps) * affinity[kept] / mass[kept, None] + eps / logits.shape[1]
        return -jnp.mean(jnp.sum(target * jax.nn.log_softmax(logits[kept], axis=1), axis=1))

    return (config.i2t_weight * direction(logits, affinity)
            + config.t2i_weight * direction(logits.T, affinity.T))


# Every loss x target kind x implementation; the sharded ones alternate between the two
# 8-device meshes.
PER_SIDE_CASES = [(name, targets, "dense", None) for name, targets in LOSS_TARGETS] + [
    (name, targets, impl, ("data8", "data4_fsdp2")[(i + j) % 2])
    for i, (name, targets) in enumerate(LOSS_TARGETS)
    for j, impl in enumerate(SHARDED)
]


@pytest.mark.parametrize("name,targets,impl,mesh_name", PER_SIDE_CASES)
def test_per_side_masks_match_references(name, targets, impl, mesh_name):
    image, text, batch = per_side_inputs()
    config = loss_config(name, targets, impl)
    mesh = make_mesh(mesh_name) if mesh_name else None
    got = run_loss(config, image, text, batch, 10.0, -5.0, mesh=mesh,
                   batch_axes=mesh.axis_names if mesh else ("data",))
    want_loss = assert_matches_reference(got, image, text, batch, config)
    grads = got[2]
    reference = jax.value_and_grad(selection_reference_loss, argnums=(0, 1, 2, 3))
    ref_loss, ref_grads = reference(jnp.asarray(image), jnp.asarray(text), jnp.float32(10.0),
                                    jnp.float32(-5.0), batch, config)
    np.testing.assert_allclose(ref_loss, want_loss, rtol=TOL, atol=TOL)
    for what, want, got in zip(("image", "text", "scale", "bias"), ref_grads, grads,
                               strict=True):
        if what == "bias" and name == "softmax":
            want = np.zeros(())  # Softmax is shift invariant: no bias gradient.
        np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL, err_msg=f"grad {what}")
    images, texts = valid_sides(batch)
    assert not grads[0][~images].any() and not grads[1][~texts].any()


@pytest.mark.parametrize("impl", ("dense",) + SHARDED)
def test_all_true_per_side_masks_are_the_default(impl):
    image, text, batch = make_inputs()
    ones = np.ones(len(image), bool)
    mesh = make_mesh("data8") if impl != "dense" else None
    for name, targets in (("softmax", "soft_labels"), ("sigmoid", "multi_positive")):
        config = loss_config(name, targets, impl)
        plain = run_loss(config, image, text, batch, 10.0, -5.0, mesh=mesh)
        flagged = run_loss(config, image, text, dict(batch, image_mask=ones, text_mask=ones),
                           10.0, -5.0, mesh=mesh)
        assert_same(plain, flagged)
        assert_same(dense_result(name, targets), plain)


def medclip_loss(image, text, image_labels, text_labels, scale, temperature, i2t_weight,
                 t2i_weight):
    """MedCLIP's semantic matching loss on an [M] x [N] batch, as the paper writes it:
    the targets are softmax(cos(labels) / T) over the other side."""
    unit = lambda labels: labels / np.linalg.norm(labels, axis=1, keepdims=True)
    cosine = jnp.asarray(unit(image_labels) @ unit(text_labels).T, jnp.float32)
    logits = scale * image @ text.T
    cross_entropy = lambda logits, cosine: -jnp.mean(jnp.sum(
        jax.nn.softmax(cosine / temperature, axis=1) * jax.nn.log_softmax(logits, axis=1),
        axis=1))
    return (i2t_weight * cross_entropy(logits, cosine)
            + t2i_weight * cross_entropy(logits.T, cosine.T))


@pytest.mark.parametrize("impl", ("dense",) + SHARDED)
def test_a_masked_image_is_a_removed_image(impl):
    """MedCLIP soft targets: image_mask False on rows R is the loss of the batch without
    those images (their reports stay), and those images get no gradient."""
    image, text, batch = make_inputs()
    labels = batch["labels"].copy()
    labels[~labels.any(axis=1), 0] = 1.0  # MedCLIP's formula needs a label on every row.
    removed = [6, 13, 14]
    image_mask = np.ones(len(image), bool)
    image_mask[removed] = False
    batch = dict(batch, labels=labels, mask=np.ones(len(image), bool), image_mask=image_mask)
    config = loss_config("softmax", "soft_labels", impl, label_smoothing=0.0)
    mesh = make_mesh("data8") if impl != "dense" else None
    loss, _, grads = run_loss(config, image, text, batch, 10.0, 0.0, mesh=mesh)

    kept = np.delete(np.arange(len(image)), removed)
    want, (want_image, want_text) = jax.value_and_grad(medclip_loss, argnums=(0, 1))(
        jnp.asarray(image[kept]), jnp.asarray(text), labels[kept], labels, 10.0,
        config.soft_target_temperature, config.i2t_weight, config.t2i_weight)
    np.testing.assert_allclose(loss, want, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(grads[0][kept], want_image, rtol=TOL, atol=TOL)
    assert not grads[0][removed].any()
    np.testing.assert_allclose(grads[1], want_text, rtol=TOL, atol=TOL)


# ----------------------------------------------------------------------------------------
# Sharded implementations against dense: every loss x target kind x implementation.

# The default run scores every loss x target kind x implementation once, spreading them
# over the four meshes; the slow sweep runs the rest of the product.
DEFAULT_CASES = [
    (name, targets, impl, list(MESHES)[(i + 2 * j) % len(MESHES)])
    for i, (name, targets) in enumerate(LOSS_TARGETS)
    for j, impl in enumerate(SHARDED)
]
SLOW_CASES = [
    (name, targets, impl, mesh)
    for mesh in MESHES
    for (name, targets), impl in itertools.product(LOSS_TARGETS, SHARDED)
    if (name, targets, impl, mesh) not in DEFAULT_CASES
]


@pytest.mark.parametrize("name,targets,impl,mesh_name", DEFAULT_CASES)
def test_sharded_matches_dense(name, targets, impl, mesh_name):
    check_against_dense(name, targets, impl, mesh_name)


@pytest.mark.slow
@pytest.mark.parametrize("name,targets,impl,mesh_name", SLOW_CASES)
def test_sharded_matches_dense_full_sweep(name, targets, impl, mesh_name):
    check_against_dense(name, targets, impl, mesh_name)


@pytest.mark.parametrize("name,impl", (("softmax", "ring"), ("sigmoid", "all_gather")))
def test_extreme_scale_nearly_identical_embeddings(name, impl):
    check_against_dense(name, "multi_positive", impl, "data8", near_identical=True,
                        scale=100.0, bias=-10.0, accuracy_tol=NEAR_TIE_ACCURACY_TOL)
    loss, metrics, grads = dense_result(name, "multi_positive", True, 100.0, -10.0)
    assert np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in grads)


@pytest.mark.slow
@pytest.mark.parametrize("impl", SHARDED)
@pytest.mark.parametrize("name,targets", LOSS_TARGETS)
def test_extreme_scale_full_sweep(name, targets, impl):
    check_against_dense(name, targets, impl, "data4_fsdp2", near_identical=True,
                        scale=100.0, bias=-10.0, accuracy_tol=NEAR_TIE_ACCURACY_TOL)


@pytest.mark.parametrize("impl", SHARDED)
def test_bfloat16_embeddings_accumulate_in_float32(impl):
    image, text, batch = make_inputs()
    image, text = jnp.asarray(image, jnp.bfloat16), jnp.asarray(text, jnp.bfloat16)
    config = loss_config("softmax", "soft_labels", impl)
    dense = run_loss(loss_config("softmax", "soft_labels"), image, text, batch, 10.0, 0.0)
    mesh = make_mesh("data4_fsdp2")
    sharded = run_loss(config, image, text, batch, 10.0, 0.0, mesh=mesh,
                       batch_axes=mesh.axis_names)
    np.testing.assert_allclose(sharded[0], dense[0], rtol=TOL, atol=TOL)
    for want, got in zip(dense[2][:2], sharded[2][:2], strict=True):
        # Gradients come back in bfloat16: equal up to its rounding (8 mantissa bits).
        np.testing.assert_allclose(got, want, rtol=2**-7, atol=1e-4)
    np.testing.assert_allclose(sharded[2][2], dense[2][2], rtol=TOL, atol=TOL)


@pytest.mark.parametrize("impl", SHARDED)
def test_batch_on_some_axes_of_a_larger_mesh(impl):
    """Batch over `data` only; the `tensor` axis holds replicas that must not double-count."""
    image, text, batch = make_inputs()
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "tensor"))
    config = loss_config("sigmoid", "multi_positive", impl)
    actual = run_loss(config, image, text, batch, 10.0, -5.0, mesh=mesh, batch_axes=("data",))
    assert_same(dense_result("sigmoid", "multi_positive"), actual)


@pytest.mark.parametrize(
    "impl", ("dense", "ring", pytest.param("all_gather", marks=pytest.mark.slow))
)
def test_explicit_sharding_mesh(impl):
    image, text, batch = make_inputs()
    mesh = make_mesh("data4_fsdp2", explicit=True)
    actual = run_loss(loss_config("softmax", "soft_labels", impl), image, text, batch, 10.0,
                      -5.0, mesh=mesh, batch_axes=mesh.axis_names)
    assert_same(dense_result("softmax", "soft_labels"), actual)


def test_ring_memory_does_not_grow_with_devices():
    """Compiled temporary memory per device at a fixed local batch: ring flat, gather grows."""

    def temp_bytes(impl, devices, local=64, dim=64):
        mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
        config = loss_config("softmax", "one_hot", impl)
        rows = NamedSharding(mesh, P("data"))
        emb = jax.ShapeDtypeStruct((local * devices, dim), jnp.float32, sharding=rows)

        def loss_fn(image, text, scale):
            return losses.contrastive_loss(image, text, scale, None, {}, config=config,
                                           mesh=mesh, batch_axes=("data",))[0]

        grad = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2)))
        compiled = grad.lower(emb, emb, jax.ShapeDtypeStruct((), jnp.float32)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    # From 4 devices on, the ring's loop runs; with 2 it is a single exchange.
    ring = temp_bytes("ring", 8) / temp_bytes("ring", 4)
    gather = temp_bytes("all_gather", 8) / temp_bytes("all_gather", 4)
    assert ring <= 1.1, ring
    assert gather > 1.5, gather


# ----------------------------------------------------------------------------------------
# Bad input.


def call_loss(image, text, batch, *, mesh=None, batch_axes=("data",), bias=0.0, **fields):
    config = loss_config(fields.pop("name", "softmax"), fields.pop("targets", "one_hot"),
                         fields.pop("impl", "all_gather"), **fields)
    return losses.contrastive_loss(image, text, jnp.float32(10.0), bias, batch,
                                   config=config, mesh=mesh, batch_axes=batch_axes)


def test_mismatched_embedding_shapes():
    image, text, batch = make_inputs()
    with pytest.raises(ValueError, match=r"same shape; got \(32, 16\) and \(32, 8\)"):
        call_loss(image, text[:, :8], batch)
    with pytest.raises(ValueError, match=r"\[batch, dim\]"):
        call_loss(image[0], text[0], batch)


def test_batch_not_divisible_by_the_batch_axes():
    image, text, batch = make_inputs(global_batch=12)
    with pytest.raises(ValueError, match=r"global batch 12 is not divisible by the 8 devices"):
        call_loss(image, text, batch, mesh=make_mesh("data8"))


def test_targets_with_the_wrong_length():
    image, text, batch = make_inputs()
    short = dict(batch, study_id=batch["study_id"][:-1])
    with pytest.raises(ValueError, match=r"batch\['study_id'\] must be int \[32\].*\(31,\)"):
        call_loss(image, text, short, targets="multi_positive")
    with pytest.raises(ValueError, match=r"batch\['mask'\] must be bool \[32\]"):
        call_loss(image, text, dict(batch, mask=batch["mask"][:16]))
    for side in ("image_mask", "text_mask"):
        with pytest.raises(ValueError, match=rf"batch\['{side}'\] must be bool \[32\].*"
                                             r"got shape \(32, 1\)"):
            call_loss(image, text, dict(batch, **{side: batch["mask"][:, None]}))
    with pytest.raises(ValueError, match=r"batch\['labels'\] must be float \[32, num_labels\]"):
        call_loss(image, text, dict(batch, labels=batch["labels"][:, 0]), targets="soft_labels")
    with pytest.raises(ValueError, match=r"needs batch\['labels'\]"):
        call_loss(image, text, {"mask": batch["mask"]}, targets="soft_labels")


def test_bad_config_and_axes():
    image, text, batch = make_inputs()
    with pytest.raises(ValueError, match=r"loss.impl='ringg' is unknown"):
        call_loss(image, text, batch, impl="ringg")
    with pytest.raises(ValueError, match=r"loss.multi_positive_key='report' is unknown"):
        call_loss(image, text, batch, multi_positive_key="study_id,report")
    with pytest.raises(ValueError, match=r"label_smoothing=1.0 must be in \[0, 1\)"):
        call_loss(image, text, batch, label_smoothing=1.0)
    with pytest.raises(ValueError, match=r"batch_axes=\('batch',\) must be distinct axes"):
        call_loss(image, text, batch, mesh=make_mesh("data8"), batch_axes="batch")
    with pytest.raises(ValueError, match=r"sigmoid loss needs a bias"):
        call_loss(image, text, batch, name="sigmoid", bias=None)


def test_loss_spec_reads_both_key_spellings():
    spec = losses.LossSpec.from_config({"multi_positive_key": "study_id, text_id"})
    assert spec.multi_positive_key == ("study_id", "text_id")
    assert losses.LossSpec.from_config({}) == losses.LossSpec()


# ----------------------------------------------------------------------------------------
# Two processes x four devices (gloo on localhost) against the single-process reference.


def test_ring_across_two_processes(tmp_path):
    out_file = tmp_path / "results.npz"
    run_two_processes(os.path.join(TESTS_DIR, "multiprocess_loss_worker.py"), out_file, 240)

    results = np.load(out_file)
    image, text, batch = multiprocess_loss_worker.global_inputs()
    for name, fields in multiprocess_loss_worker.CONFIGS.items():
        config = ml_collections.ConfigDict(dict(fields, impl="dense", tile_size=0))
        scale, bias = multiprocess_loss_worker.SCALE, multiprocess_loss_worker.BIAS
        want = run_loss(config, image, text, batch, scale, bias)
        got = (
            results[f"{name}/loss"],
            {key: results[f"{name}/{key}"] for key in want[1]},
            [results[f"{name}/grad_{key}"] for key in ("image", "text", "scale", "bias")],
        )
        assert_same(want, got)
        # And against the float64 transcription of the semantics.
        config = losses.LossSpec.from_config(config)
        np.testing.assert_allclose(
            got[0], numpy_reference(image, text, scale, bias, batch, config)[0], rtol=TOL,
            atol=TOL)
        reference = numpy_reference_grads(image, text, scale, bias, batch, config)
        for what, want_grad, got_grad in zip("image text scale bias".split(), reference,
                                             got[2], strict=True):
            np.testing.assert_allclose(got_grad, want_grad, rtol=TOL, atol=TOL,
                                       err_msg=f"{name} grad {what}")
