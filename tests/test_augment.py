"""Stateless in-graph augmentation: a function of (seed, position), in range, optional."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
from pipeline_reference import warp_from_source

from input_pipeline import augment
from input_pipeline.augment import AugmentConfig, augment_images, source_warps, uniform

ALL_ON = AugmentConfig(crop_scale=(0.5, 1.0), crop_aspect=(0.8, 1.25), rotation_degrees=10,
                       brightness=0.1, contrast=0.2, gamma=0.2)


def images(n=6, size=24, seed=0):
    return tf.constant(np.random.default_rng(seed).random((n, size, size, 1), np.float32))


def test_uniform_is_a_function_of_seed_salt_and_position():
    positions = tf.constant([5, 9, 5, 10**12], tf.int64)
    u = uniform(0, 1, positions, 4).numpy()
    assert u.shape == (4, 4) and ((u > 0) & (u < 1)).all()
    np.testing.assert_array_equal(u[0], u[2])
    np.testing.assert_array_equal(u[1:2], uniform(0, 1, positions[1:2], 4).numpy())
    assert not np.array_equal(u[0], u[1])
    assert not np.array_equal(u, uniform(1, 1, positions, 4).numpy())
    assert not np.array_equal(u, uniform(0, 2, positions, 4).numpy())
    draws = uniform(3, 1, tf.range(4000, dtype=tf.int64), 2).numpy()
    assert abs(draws.mean() - 0.5) < 0.02 and abs(np.corrcoef(draws.T)[0, 1]) < 0.05


def test_deterministic_per_position_and_independent_of_the_batch():
    x, positions = images(), tf.range(100, 106, dtype=tf.int64)
    out = augment_images(x, positions, 0, ALL_ON).numpy()
    np.testing.assert_array_equal(out, augment_images(x, positions, 0, ALL_ON).numpy())
    # Each row the same alone, in halves, or in another order: process count and
    # resume cannot change it.
    for rows in ([0, 1, 2], [3, 4, 5], [5, 0, 3]):
        part = augment_images(tf.gather(x, rows), tf.gather(positions, rows), 0, ALL_ON)
        np.testing.assert_array_equal(part.numpy(), out[rows])
    other = augment_images(x, positions + 1, 0, ALL_ON).numpy()
    assert all(not np.array_equal(a, b) for a, b in zip(out, other, strict=True))
    assert not np.array_equal(out, augment_images(x, positions, 1, ALL_ON).numpy())


def test_output_stays_in_range_and_shape():
    x = images(16)
    out = augment_images(x, tf.range(16, dtype=tf.int64), 7, ALL_ON).numpy()
    assert out.shape == x.shape and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 1 and np.isfinite(out).all()
    assert not np.allclose(out, x.numpy(), atol=0.05)


def test_off_by_default():
    config = AugmentConfig.from_config(None)
    assert not config.enabled and config == AugmentConfig.from_config({})
    assert not AugmentConfig.from_config({"horizontal_flip": False}).enabled
    x = images()
    np.testing.assert_array_equal(augment_images(x, tf.range(6), 0, config).numpy(), x.numpy())


def test_whole_image_crop_is_the_identity():
    # Area 1 and aspect 1 crop the whole image; without rotation the resampling must hit
    # the pixel centres exactly.
    config = AugmentConfig(crop_scale=(1.0, 1.0), crop_aspect=(1.0, 1.0))
    x = images()
    np.testing.assert_allclose(augment_images(x, tf.range(6), 0, config).numpy(), x.numpy(),
                               atol=1e-6)


def test_crop_zooms_in():
    # A bright centre square on black: cropping a quarter of the area doubles its size.
    x = np.zeros((1, 32, 32, 1), np.float32)
    x[:, 12:20, 12:20] = 1
    config = AugmentConfig(crop_scale=(0.25, 0.25), crop_aspect=(1.0, 1.0))
    out = augment_images(tf.constant(x), tf.constant([3]), 0, config).numpy()
    assert 1.5 * x.sum() < out.sum() < 4.5 * x.sum()


def test_horizontal_flip_mirrors_some_images_exactly():
    x = images(32)
    out = augment_images(x, tf.range(32), 0, AugmentConfig(horizontal_flip=True)).numpy()
    flipped = [np.allclose(o, xi[:, ::-1], atol=1e-6) for o, xi in zip(out, x.numpy(), strict=True)]
    kept = [np.allclose(o, xi, atol=1e-6) for o, xi in zip(out, x.numpy(), strict=True)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))
    assert 4 < sum(flipped) < 28


def test_photometric_jitter_bounds():
    x = tf.fill([64, 4, 4, 1], 0.5)
    brightness = augment_images(x, tf.range(64), 0, AugmentConfig(brightness=0.1)).numpy()
    assert np.abs(brightness - 0.5).max() <= 0.1 + 1e-6 and brightness.std() > 0.02
    ramp = tf.constant(np.linspace(0.1, 0.9, 16, dtype=np.float32).reshape(1, 4, 4, 1))
    gamma = augment_images(tf.tile(ramp, [64, 1, 1, 1]), tf.range(64), 0,
                           AugmentConfig(gamma=0.2)).numpy()
    low, high = ramp.numpy() ** 1.2, ramp.numpy() ** 0.8
    assert (gamma >= low - 1e-6).all() and (gamma <= high + 1e-6).all()


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="data.augment.rotation is not a config field"):
        AugmentConfig.from_config({"rotation": 5})
    with pytest.raises(ValueError, match="crop_scale"):
        AugmentConfig.from_config({"crop_scale": (0.0, 1.0)})
    with pytest.raises(ValueError, match="brightness"):
        AugmentConfig(brightness=1.5)


GEOMETRIC = AugmentConfig(crop_scale=(0.5, 1.0), crop_aspect=(0.8, 1.25), rotation_degrees=10)


def source(height, width, seed=0):
    """A source with edges, texture and noise."""
    rng = np.random.default_rng(seed)
    walk = np.cumsum(np.cumsum(rng.normal(size=(height, width)), 0), 1)
    walk = (walk - walk.min()) / (walk.max() - walk.min())
    return tf.constant((0.7 * walk + 0.3 * (rng.random((height, width)) > 0.5))
                       .astype(np.float32)[..., None])


@pytest.mark.parametrize("k_y,k_x", [(1, 1), (2, 2), (2, 1), (1, 2), (3, 3), (3, 2), (4, 5)])
def test_block_mean_is_exact(k_y, k_x):
    image = source(23, 31)
    rows, cols = 23 // k_y, 31 // k_x
    expected = image.numpy()[:rows * k_y, :cols * k_x].reshape(rows, k_y, cols, k_x, 1)
    got = augment._block_mean(image, tf.constant(k_y), tf.constant(k_x)).numpy()
    np.testing.assert_allclose(got, expected.mean(axis=(1, 3)), atol=1e-6)


@pytest.mark.parametrize("config", [GEOMETRIC, AugmentConfig(crop_scale=(0.5, 1.0)),
                                    AugmentConfig(horizontal_flip=True)])
def test_warping_a_source_of_the_output_size_is_augment_images(config):
    # Without resizing, the fused warp is the geometric part of augment_images.
    images = [source(24, 24, seed) for seed in range(6)]
    expected = augment_images(tf.stack(images), tf.range(6), 4, config).numpy()
    for i, image in enumerate(images):
        got = warp_from_source(image, tf.constant(i), 4, config, 24).numpy()
        np.testing.assert_allclose(got, expected[i], atol=1e-5)


WHOLE = AugmentConfig(crop_scale=(1.0, 1.0), crop_aspect=(1.0, 1.0))
# Rotation takes the block-mean-and-warp path; 0.0001 degrees moves no pixel by 1e-4.
WHOLE_ROTATED = dataclasses.replace(WHOLE, rotation_degrees=1e-4)


@pytest.mark.parametrize("config", [WHOLE, WHOLE_ROTATED])
def test_whole_image_crop_of_a_source_of_the_output_size_is_the_identity(config):
    image = source(32, 32)
    np.testing.assert_allclose(warp_from_source(image, tf.constant(2), 0, config, 32), image,
                               atol=1e-4)


def test_whole_image_crop_of_a_larger_source():
    image = source(64, 64)
    # Without rotation: the antialiased resize of decode_and_resize, exactly.
    np.testing.assert_allclose(warp_from_source(image, tf.constant(2), 0, WHOLE, 32),
                               tf.image.resize_with_pad(image, 32, 32, antialias=True),
                               atol=1e-6)
    # With rotation: the 2 x 2 block means, read at their centres.
    blocks = image.numpy().reshape(32, 2, 32, 2, 1).mean(axis=(1, 3))
    np.testing.assert_allclose(warp_from_source(image, tf.constant(2), 0, WHOLE_ROTATED, 32),
                               blocks, atol=1e-4)


@pytest.mark.parametrize("config", [WHOLE, WHOLE_ROTATED])
def test_a_non_square_source_keeps_its_aspect_ratio_with_zero_padding(config):
    # 40 x 80 into 32 x 32: 16 rows of image between 8 rows of zeros above and below, as
    # decode_and_resize places it.
    ramp = np.tile(np.linspace(0.2, 1.0, 80, dtype=np.float32), (40, 1))[..., None]
    got = warp_from_source(tf.constant(ramp), tf.constant(0), 0, config, 32).numpy()
    resized = tf.image.resize_with_pad(ramp, 32, 32, antialias=True).numpy()
    assert not got[:8].any() and not got[24:].any() and (got[8:24] > 0.1).all()
    np.testing.assert_allclose(got[8:24], resized[8:24], atol=0.02)


@pytest.mark.parametrize("config", [GEOMETRIC, dataclasses.replace(GEOMETRIC,
                                                                    rotation_degrees=0.0)])
def test_source_warp_is_about_as_sharp_as_the_evaluation_resize(config):
    # A large source warped once should look like the resized evaluation images: the
    # previous resize-then-warp training images had half their high frequencies.
    def detail(x):
        x = x[2:-2, 2:-2, 0]
        return np.abs(4 * x[1:-1, 1:-1] - x[:-2, 1:-1] - x[2:, 1:-1] - x[1:-1, :-2]
                      - x[1:-1, 2:]).mean()

    for height, width in ((128, 128), (150, 120)):
        image = source(height, width)
        resized = tf.image.resize_with_pad(image, 32, 32, antialias=True).numpy()
        warped = [warp_from_source(image, tf.constant(p), 0, config, 32).numpy()
                  for p in range(8)]
        ratio = np.mean([detail(w) for w in warped]) / detail(resized)
        assert 0.75 < ratio < 1.35, (height, width, ratio)


def test_source_warps_need_a_geometric_augmentation():
    with pytest.raises(ValueError, match="geometric"):
        source_warps(tf.constant([0], tf.int64), 0, AugmentConfig(gamma=0.1), 8,
                     tf.constant([8]), tf.constant([8]))
