"""Training-time image augmentation inside the tf.data graph, stateless and batched.

Every random number is a hash of (seed, salt, global example position) only
(`uniform`), so a resumed run, or a run with another number of processes, draws exactly
the same augmentation for the same example position.

Configured by `data.augment` (absent, None or all defaults: no augmentation):

    crop_scale        (min, max) area fraction of a random resized crop; None: no crop
    crop_aspect       (min, max) width / height of the crop, drawn log-uniformly
    rotation_degrees  rotation drawn uniformly from [-r, r]
    brightness        additive delta drawn from [-b, b] (on [0, 1] intensities)
    contrast          factor drawn from [1 - c, 1 + c] around mid-grey 0.5
    gamma             exponent drawn from [1 - g, 1 + g]
    horizontal_flip   mirror half of the images (off: laterality is in the reports)

The geometry is defined on the image resized to the model's size (aspect kept, zero
padding) with intensities in [0, 1]: the crop is taken from that image and stretched back
to full size (zoom in only), rotated about its centre; pixels from outside the image are
0, like the padding. Two ways to apply it, the same transform (the image stage,
input_pipeline/stages/pixels.py, picks one):

- `augment_images`: batched, on images already resized (training with a crop or flip
  and no rotation);
- `source_warps` + `warp_source` (training with rotation): the resize and the warp as
  one resampling of the decoded source, its warp computed batched from the PNG header
  before decoding; then `photometric`, batched. Half the resampling work and one
  interpolation instead of two (docs/benchmarks.md, "Input pipeline").
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections
import tensorflow as tf

from jaxmedclip import config_schema

# Salts: independent random streams per use (the stages in input_pipeline/stages/ have theirs).
SALT_GEOMETRY = 11
SALT_PHOTOMETRIC = 12
# Stream k (e.g. the second image of a multi-view example, k = 1) offsets every salt by
# k * SALT_STREAM_STRIDE: an independent draw for the same example position.
SALT_STREAM_STRIDE = 1000
_UNIFORM_BITS = 24  # float32 holds every value of a 24-bit draw exactly.
_WIDEST_PACKET = 16  # float32 lanes of the widest SIMD registers (AVX-512).
_DEFAULT = config_schema.defaults("data.augment")  # The defaults are declared there.


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """`data.augment` as typed values; the defaults change nothing."""

    crop_scale: tuple[float, float] | None = _DEFAULT["crop_scale"]
    crop_aspect: tuple[float, float] = _DEFAULT["crop_aspect"]
    rotation_degrees: float = _DEFAULT["rotation_degrees"]
    brightness: float = _DEFAULT["brightness"]
    contrast: float = _DEFAULT["contrast"]
    gamma: float = _DEFAULT["gamma"]
    horizontal_flip: bool = _DEFAULT["horizontal_flip"]

    def __post_init__(self):
        if self.crop_scale is not None:
            low, high = self.crop_scale
            if not 0 < low <= high <= 1:
                raise ValueError(f"data.augment.crop_scale={self.crop_scale}: need "
                                 "0 < min <= max <= 1 (fractions of the image area)")
        low, high = self.crop_aspect
        if not 0 < low <= high:
            raise ValueError(f"data.augment.crop_aspect={self.crop_aspect}: need "
                             "0 < min <= max")
        if not 0 <= self.rotation_degrees <= 180:
            raise ValueError(f"data.augment.rotation_degrees={self.rotation_degrees} "
                             "outside [0, 180]")
        for name in ("brightness", "contrast", "gamma"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ValueError(f"data.augment.{name}={value} outside [0, 1)")

    @classmethod
    def from_config(cls, augment: ml_collections.ConfigDict | dict | None) -> AugmentConfig:
        """From `data.augment` (None: no augmentation), checked against its declared
        fields (`config_schema.AUGMENT`): a typo would otherwise silently do nothing."""
        values = config_schema.complete_section("data.augment", augment)
        for key in ("crop_scale", "crop_aspect"):
            if values.get(key) is not None:
                values[key] = tuple(float(v) for v in values[key])
        return cls(**values)

    @property
    def geometric(self) -> bool:
        return (self.crop_scale is not None or self.rotation_degrees > 0
                or self.horizontal_flip)

    @property
    def photometric(self) -> bool:
        return self.brightness > 0 or self.contrast > 0 or self.gamma > 0

    @property
    def enabled(self) -> bool:
        return self.geometric or self.photometric


def uniform(seed: int, salt: int, positions: tf.Tensor, count: int) -> tf.Tensor:
    """float32 [N, count] in (0, 1): draw j of row i is a function of (seed, salt,
    positions[i], j) only (`keyed_uniform`)."""
    positions = tf.cast(tf.reshape(positions, [-1]), tf.int64)
    rows = tf.shape(positions)[0]
    draws = tf.tile(tf.range(count, dtype=tf.int64), [rows])
    return tf.reshape(keyed_uniform(seed, salt, tf.repeat(positions, count), draws),
                      [rows, count])


def keyed_uniform(seed: int, salt: int, positions: tf.Tensor, draws: tf.Tensor) -> tf.Tensor:
    """Elementwise float32 in (0, 1), a hash of (seed, salt, position, draw): stateless,
    batched, and the same for an element whatever tensor it sits in.

    SplitMix64's finaliser, chained over the four integers (uint64 arithmetic wraps).
    """
    xor = tf.bitwise.bitwise_xor
    key = _mix64(xor(_mix64(tf.constant(seed, tf.uint64)), tf.constant(salt, tf.uint64)))
    value = _mix64(xor(key, tf.bitcast(tf.cast(positions, tf.int64), tf.uint64)))
    value = _mix64(xor(value, tf.bitcast(tf.cast(draws, tf.int64), tf.uint64)))
    top = tf.bitwise.right_shift(value, tf.constant(64 - _UNIFORM_BITS, tf.uint64))
    return (tf.cast(top, tf.float32) + 0.5) / 2**_UNIFORM_BITS


def _mix64(x: tf.Tensor) -> tf.Tensor:
    x = x + tf.constant(0x9E3779B97F4A7C15, tf.uint64)
    xor, shift = tf.bitwise.bitwise_xor, tf.bitwise.right_shift
    x = xor(x, shift(x, tf.constant(30, tf.uint64))) * tf.constant(0xBF58476D1CE4E5B9,
                                                                   tf.uint64)
    x = xor(x, shift(x, tf.constant(27, tf.uint64))) * tf.constant(0x94D049BB133111EB,
                                                                   tf.uint64)
    return xor(x, shift(x, tf.constant(31, tf.uint64)))


def augment_images(images: tf.Tensor, positions: tf.Tensor, seed: int,
                   config: AugmentConfig, stream: int = 0) -> tf.Tensor:
    """float32 [N, S, S, C] in [0, 1] -> augmented, same shape and range.

    `stream`: which independent augmentation of an example position (0: the image;
    1: the second image of a multi-view example)."""
    if config.geometric:
        u = uniform(seed, SALT_GEOMETRY + stream * SALT_STREAM_STRIDE, positions, 6)
        images = _geometric(images, u, config)
    return photometric(images, positions, seed, config, stream)


def photometric(images: tf.Tensor, positions: tf.Tensor, seed: int, config: AugmentConfig,
                stream: int = 0) -> tf.Tensor:
    """The brightness / contrast / gamma part of `augment_images` alone."""
    if not config.photometric:
        return images
    u = uniform(seed, SALT_PHOTOMETRIC + stream * SALT_STREAM_STRIDE, positions, 3)
    return _photometric(images, u, config)


def source_warps(positions: tf.Tensor, seed: int, config: AugmentConfig, size: int,
                 source_height: tf.Tensor, source_width: tf.Tensor, stream: int = 0
                 ) -> dict[str, tf.Tensor]:
    """The geometric augmentation of examples [N] whose decoded sources are
    source_height x source_width: `warp_source`'s per-image arguments, batched [N, ...].

    Resizing and then warping resamples twice: twice the work and twice the blur of one
    resampling. Here each image is resampled once, from its source:

    - crop and flip alone (no rotation): an antialiased resize of the crop box (the
      triangle filter of the evaluation's `decode_and_resize`, scaled to the crop),
      then the mirror;
    - with rotation: where the warp reads more than 1.5 source pixels per output pixel,
      the source is first averaged over blocks of k_y x k_x pixels (k rounded from that
      ratio, per axis), then warped bilinearly: a box filter where the resize has a
      triangle; with the warp's interpolation, about as sharp as the evaluation images
      (tests/test_augment.py). At k = 1 the warp reads the source pixels directly.
    """
    if not config.geometric:
        raise ValueError("source_warps needs a geometric augmentation "
                         "(crop_scale, rotation_degrees or horizontal_flip)")
    u = uniform(seed, SALT_GEOMETRY + stream * SALT_STREAM_STRIDE, positions, 6)
    geometry = _crop_geometry(u, config, float(size), float(size))
    flip = geometry[5]
    if not config.rotation_degrees:  # The flip is applied after resampling.
        geometry = (*geometry[:5], tf.ones_like(flip), *geometry[6:])
    # Output pixel -> the padded frame of decode_and_resize (TensorFlow's convention:
    # pixel centres at integer coordinates).
    a = tf.unstack(_frame_affine(*geometry), axis=1)
    # Frame -> source: tf.image.resize_with_pad's geometry, computed as it computes it
    # (float32), then its resize's half-pixel-centre mapping f -> (f - pad + 0.5) s - 0.5.
    height = tf.maximum(tf.cast(tf.reshape(source_height, [-1]), tf.float32), 1.0)
    width = tf.maximum(tf.cast(tf.reshape(source_width, [-1]), tf.float32), 1.0)
    ratio = tf.maximum(width / size, height / size)
    pad_h = tf.maximum(0.0, tf.floor((size - height / ratio) / 2))
    pad_w = tf.maximum(0.0, tf.floor((size - width / ratio) / 2))
    scale_y, scale_x = height / tf.floor(height / ratio), width / tf.floor(width / ratio)
    if not config.rotation_degrees:
        # ScaleAndTranslate reads output x (pixel edges at integers) at source
        # (x - translation) / scale; here source = scale_x * (a0 x + a2 - a0 / 2 - pad + 1/2).
        return {"scale": tf.stack([1 / (scale_y * a[4]), 1 / (scale_x * a[0])], axis=1),
                "translation": tf.stack([(pad_h - 0.5 - a[5]) / a[4] + 0.5,
                                         (pad_w - 0.5 - a[2]) / a[0] + 0.5], axis=1),
                "mirror": flip < 0}
    # Source pixels per output pixel along each output axis -> block size per axis.
    k_x = tf.maximum(1.0, tf.round(scale_x * tf.sqrt(a[0] ** 2 + a[3] ** 2)))
    k_y = tf.maximum(1.0, tf.round(scale_y * tf.sqrt(a[1] ** 2 + a[4] ** 2)))
    # Frame f -> block coordinate ((f - pad + 0.5) * scale - 0.5 - (k - 1) / 2) / k.
    gx, cx = scale_x / k_x, ((0.5 - pad_w) * scale_x - 0.5 - (k_x - 1) / 2) / k_x
    gy, cy = scale_y / k_y, ((0.5 - pad_h) * scale_y - 0.5 - (k_y - 1) / 2) / k_y
    zero = tf.zeros_like(gx)
    transform = tf.stack([gx * a[0], gx * a[1], gx * a[2] + cx,
                          gy * a[3], gy * a[4], gy * a[5] + cy, zero, zero], axis=1)
    return {"transform": transform, "block": tf.cast(tf.stack([k_y, k_x], axis=1), tf.int32)}


def warp_source(image: tf.Tensor, warp: dict[str, tf.Tensor], size: int) -> tf.Tensor:
    """[h, w, C] -> [size, size, C] by one image's `source_warps`; zero outside the image."""
    if "transform" not in warp:
        out = tf.raw_ops.ScaleAndTranslate(
            images=image[None], size=[size, size], scale=warp["scale"],
            translation=warp["translation"], kernel_type="triangle", antialias=True)[0]
        return tf.cond(warp["mirror"], lambda: out[:, ::-1], lambda: out)
    image = _block_mean(image, warp["block"][0], warp["block"][1])
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=warp["transform"][None], output_shape=[size, size],
        fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")[0]


def _block_mean(image: tf.Tensor, k_y: tf.Tensor, k_x: tf.Tensor) -> tf.Tensor:
    """[h, w, C] -> [h // k_y, w // k_x, C], the mean of each k_y x k_x block (a remainder
    of fewer than k rows or columns at the bottom and right is left out)."""
    shape = tf.shape(image)
    rows, cols = shape[0] // k_y, shape[1] // k_x
    whole = image[:rows * k_y, :cols * k_x]
    # Bilinear resizing by a factor of 1 or 2 along an axis reads each output pixel
    # halfway between two input pixels: the exact block mean, and faster than the area
    # resize, which is exact for any integer factor.
    return tf.case([(tf.reduce_all(tf.equal([k_y, k_x], 1)), lambda: image),
                    (tf.reduce_all(tf.less_equal([k_y, k_x], 2)),
                     lambda: tf.image.resize(whole, [rows, cols], method="bilinear"))],
                   default=lambda: tf.image.resize(whole, [rows, cols], method="area"))


def rowwise(fn, x: tf.Tensor, *args: tf.Tensor) -> tf.Tensor:
    """`fn(x, *args)` for a transcendental elementwise `fn` (exp, sin, pow...), each row
    of x [N, ...] computed the same way whatever N is.

    Eigen evaluates such functions with SIMD approximations, but the last elements of a
    buffer that does not fill a SIMD register take a scalar path with slightly different
    results; a row must not round differently because the batch around it is split over
    more processes. Rows padded to whole registers always take the SIMD path. `args` are
    per-row values [N] broadcast along the row.
    """
    rows = tf.shape(x)[0]
    flat = tf.reshape(x, [rows, -1])
    size = tf.shape(flat)[1]
    padded = tf.pad(flat, [[0, 0], [0, (-size) % _WIDEST_PACKET]], constant_values=1.0)
    out = fn(padded, *(a[:, None] for a in args))
    return tf.reshape(out[:, :size], tf.shape(x))


def _between(u: tf.Tensor, low: float, high: float) -> tf.Tensor:
    return low + (high - low) * u


def _crop_geometry(u: tf.Tensor, config: AugmentConfig, height: float, width: float
                   ) -> tuple[tf.Tensor, ...]:
    """Per image [N]: crop width and height, crop centre x and y (pixel edges at integer
    coordinates), rotation angle (radians) and flip (-1 mirrored, 1 not)."""
    if config.crop_scale is None:
        crop_w, crop_h = tf.fill(tf.shape(u[:, 0]), width), tf.fill(tf.shape(u[:, 0]), height)
    else:
        area = _between(u[:, 0], *config.crop_scale) * width * height
        log_aspect = _between(u[:, 1], *(math.log(a) for a in config.crop_aspect))
        aspect = rowwise(tf.exp, log_aspect)
        crop_w = tf.minimum(tf.sqrt(area * aspect), width)
        crop_h = tf.minimum(tf.sqrt(area / aspect), height)
    centre_x = crop_w / 2 + u[:, 2] * (width - crop_w)
    centre_y = crop_h / 2 + u[:, 3] * (height - crop_h)
    angle = _between(u[:, 4], -1.0, 1.0) * (config.rotation_degrees * math.pi / 180)
    flip = tf.ones_like(angle)
    if config.horizontal_flip:
        flip = tf.where(u[:, 5] < 0.5, -1.0, 1.0)
    return crop_w, crop_h, centre_x, centre_y, angle, flip, height, width


def _frame_affine(crop_w, crop_h, centre_x, centre_y, angle, flip, height, width
                  ) -> tf.Tensor:
    """[N, 6]: output pixel (x, y) -> (a0 x + a1 y + a2, a3 x + a4 y + a5) in the input
    image, both with pixel centres at integer coordinates (TensorFlow's convention)."""
    cos, sin = rowwise(tf.cos, angle), rowwise(tf.sin, angle)
    # Output pixel (x, y) has centre (x + 0.5, y + 0.5); its offset from the crop centre
    # is (du, dv) = (flip * ((x + 0.5) * sx - w / 2), (y + 0.5) * sy - h / 2), rotated
    # into the input.
    sx, sy = flip * crop_w / width, crop_h / height
    ox, oy = flip * (0.5 * crop_w / width - crop_w / 2), 0.5 * crop_h / height - crop_h / 2
    return tf.stack([cos * sx, -sin * sy, centre_x - 0.5 + cos * ox - sin * oy,
                     sin * sx, cos * sy, centre_y - 0.5 + sin * ox + cos * oy], axis=1)


def _geometric(images: tf.Tensor, u: tf.Tensor, config: AugmentConfig) -> tf.Tensor:
    """One projective resampling per image: crop, rotation and flip together."""
    height = tf.cast(tf.shape(images)[1], tf.float32)
    width = tf.cast(tf.shape(images)[2], tf.float32)
    geometry = _crop_geometry(u, config, height, width)
    crop_w, crop_h, centre_x, centre_y, _, flip = geometry[:6]
    if not config.rotation_degrees:
        # Crop (and flip) alone: crop_and_resize is several times faster than the general
        # projective resampling. Box corners are the outermost pixel centres, normalised.
        x0 = (centre_x - crop_w / 2 + 0.5 * crop_w / width - 0.5) / (width - 1)
        x1 = (centre_x + crop_w / 2 - 0.5 * crop_w / width - 0.5) / (width - 1)
        y0 = (centre_y - crop_h / 2 + 0.5 * crop_h / height - 0.5) / (height - 1)
        y1 = (centre_y + crop_h / 2 - 0.5 * crop_h / height - 0.5) / (height - 1)
        x0, x1 = tf.where(flip < 0, x1, x0), tf.where(flip < 0, x0, x1)
        return tf.image.crop_and_resize(
            images, tf.stack([y0, x0, y1, x1], axis=1), tf.range(tf.shape(images)[0]),
            tf.shape(images)[1:3], method="bilinear")
    affine = _frame_affine(*geometry)
    transforms = tf.concat([affine, tf.zeros_like(affine[:, :2])], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=tf.shape(images)[1:3],
        fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")


def _photometric(images: tf.Tensor, u: tf.Tensor, config: AugmentConfig) -> tf.Tensor:
    """Gamma, then contrast around mid-grey, then brightness; clipped to [0, 1].

    Elementwise only: a per-image reduction (e.g. contrast around the image mean) is
    summed in an order that depends on the batch shape, and the rows of one process's
    batch must equal, bit for bit, the same rows of a batch split over more processes."""
    def per_image(values):
        return values[:, None, None, None]

    if config.gamma:
        gamma = _between(u[:, 0], 1 - config.gamma, 1 + config.gamma)
        # exp(gamma * log x): Eigen vectorises exp and log, not pow (several times slower).
        images = rowwise(lambda x, g: tf.exp(g * tf.math.log(x)),
                         tf.clip_by_value(images, 0.0, 1.0), gamma)
    if config.contrast:
        factor = _between(u[:, 1], 1 - config.contrast, 1 + config.contrast)
        images = 0.5 + per_image(factor) * (images - 0.5)
    if config.brightness:
        images = images + per_image(_between(u[:, 2], -config.brightness, config.brightness))
    return tf.clip_by_value(images, 0.0, 1.0)
