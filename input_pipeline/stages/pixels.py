"""The image stage: PNG bytes -> normalised float32 [S, S, 1] images.

Each image is resized to S = `data.image_size` with its aspect ratio kept (zero padding)
and scaled to [0, 1]; training augments it (`data.augment`, augment.py), then every
image becomes (x - `data.image_mean`) / `data.image_std`. Training with rotation
resamples each image once, straight from its decoded source (`augment.source_warps`,
computed batched from the PNG header before decoding, and `warp_source`), instead of
resizing and then warping; a crop or flip alone keeps the resize and `augment_images`,
the path the Quickstart's figures were measured on (docs/benchmarks.md, "Input
pipeline"). Bytes that are not an intact PNG are never decoded: the example is skipped.
"""

from __future__ import annotations

import struct
import zlib

import ml_collections
import numpy as np
import tensorflow as tf

from input_pipeline.augment import (
    AugmentConfig,
    augment_images,
    photometric,
    source_warps,
    warp_source,
)
from jaxmedclip import config_schema

IMAGE_NAMES = ("image", "image2")  # Stream k augments IMAGE_NAMES[k].
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_is_intact(data: bytes) -> bool:
    """True when `data` is a structurally complete PNG: signature, IHDR first with a
    non-empty size, every chunk's CRC, at least one IDAT, IEND last."""
    if not data.startswith(_PNG_SIGNATURE):
        return False
    offset, end, first, has_idat = len(_PNG_SIGNATURE), len(data), True, False
    while offset + 12 <= end:
        length, kind = struct.unpack_from(">I4s", data, offset)
        stop = offset + 12 + length
        if stop > end:
            return False
        body = data[offset + 8: offset + 8 + length]
        (crc,) = struct.unpack_from(">I", data, offset + 8 + length)
        if zlib.crc32(body, zlib.crc32(kind)) != crc:
            return False
        if first:
            if kind != b"IHDR" or length != 13:
                return False
            width, height = struct.unpack_from(">II", body)
            if not width or not height:
                return False
            first = False
        has_idat |= kind == b"IDAT"
        if kind == b"IEND":
            return has_idat and stop == end
        offset = stop
    return False


def png_size(encoded_png: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """PNG bytes [N] -> (height, width) int32 [N] from the IHDR chunk, without decoding.
    Bytes missing from a short string read as 0 (`png_is_intact` rejects such strings)."""
    header = tf.strings.substr(tf.strings.join([encoded_png, b"\0" * 24]), 16, 8)
    header = tf.cast(tf.io.decode_raw(header, tf.uint8), tf.int32)  # Big-endian.
    width = tf.reduce_sum(header[:, :4] * [1 << 24, 1 << 16, 1 << 8, 1], axis=1)
    height = tf.reduce_sum(header[:, 4:] * [1 << 24, 1 << 16, 1 << 8, 1], axis=1)
    return height, width


def decode_png(encoded_png: tf.Tensor) -> tf.Tensor:
    """PNG bytes (8- or 16-bit grayscale) -> float32 [h, w, 1] in [0, 1]."""
    image = tf.io.decode_png(encoded_png, channels=1, dtype=tf.uint16)
    return tf.image.convert_image_dtype(image, tf.float32)  # [0, 1] for both bit depths.


def decode_and_resize(encoded_png: tf.Tensor, size: int) -> tf.Tensor:
    """PNG bytes (8- or 16-bit grayscale) -> float32 [size, size, 1] in [0, 1], aspect
    ratio kept (zero padding)."""
    return resize_with_pad(decode_png(encoded_png), size)


def resize_with_pad(image: tf.Tensor, size: int) -> tf.Tensor:
    """float32 [h, w, 1] -> [size, size, 1], aspect ratio kept (zero padding)."""
    return tf.image.resize_with_pad(image, size, size, method="bilinear", antialias=True)


def normalize(images: tf.Tensor, data_config: ml_collections.ConfigDict) -> tf.Tensor:
    """[0, 1] intensities -> the model's input scale."""
    return (images - data_config.image_mean) / data_config.image_std


def to_batch_images(images: tf.Tensor, data_config: ml_collections.ConfigDict) -> tf.Tensor:
    """[0, 1] intensities -> the batch's `image` (jaxmedclip/batch_schema.py): normalised
    float32, or scaled to `data.image_dtype`'s integer range for the device to normalise."""
    dtype = data_config.get("image_dtype", "float32")
    if dtype == "float32":
        return normalize(images, data_config)
    top = float(np.iinfo(dtype).max)
    return tf.cast(tf.round(tf.clip_by_value(images, 0.0, 1.0) * top), dtype)


def image_preprocess(encoded_png: tf.Tensor, data_config: ml_collections.ConfigDict
                     ) -> tf.Tensor:
    """PNG bytes -> normalised float32 [S, S, 1]: one image as evaluation reads it."""
    return normalize(decode_and_resize(encoded_png, data_config.image_size), data_config)


def pixels_preprocess(pixels: tf.Tensor, data_config: ml_collections.ConfigDict) -> tf.Tensor:
    """uint16 [h, w, 1] pixels, as a builder stores them -> what `image_preprocess` makes
    of their PNG: the same steps without the encode / decode round trip."""
    image = tf.image.convert_image_dtype(pixels, tf.float32)  # As decode_png does.
    return normalize(resize_with_pad(image, data_config.image_size), data_config)


class PixelStage:
    """The image stage's three steps: `intact` and `warps` on a batch of encoded images,
    `decode` per image, `finish` on the batch of decoded images."""

    def __init__(self, data_config: ml_collections.ConfigDict, seed: int, train: bool):
        data_config = config_schema.filled("data", data_config)
        self.data_config, self.seed, self.train = data_config, seed, train
        self.size = data_config.image_size
        self.augment = AugmentConfig.from_config(data_config.augment)
        self.warp_from_source = train and self.augment.rotation_degrees > 0

    def intact(self, encoded: tf.Tensor) -> tf.Tensor:
        """bool [N]: which of the PNG bytes [N] are intact (`png_is_intact`)."""
        ok = tf.numpy_function(
            lambda images: np.array([png_is_intact(x) for x in images.tolist()], dtype=bool),
            [encoded], tf.bool, stateful=False, name="check_png")
        ok.set_shape(encoded.shape)
        return ok

    def warps(self, encoded: tf.Tensor, positions: tf.Tensor, stream: int
              ) -> dict[str, tf.Tensor] | None:
        """Each image's source warp, batched from the PNG headers of `encoded` [N]; None
        where images are resized instead."""
        if not self.warp_from_source:
            return None
        return source_warps(positions, self.seed, self.augment, self.size,
                            *png_size(encoded), stream=stream)

    def decode(self, encoded: tf.Tensor, keep: tf.Tensor,
               warp: dict[str, tf.Tensor] | None) -> tf.Tensor:
        """One image: float32 [S, S, 1] in [0, 1], or zeros where `keep` is False."""
        if warp is not None:
            def load():
                return warp_source(decode_png(encoded), warp, self.size)
        else:
            def load():
                return decode_and_resize(encoded, self.size)
        return tf.cond(keep, load, lambda: tf.zeros([self.size, self.size, 1], tf.float32))

    def finish(self, images: tf.Tensor, positions: tf.Tensor, stream: int) -> tf.Tensor:
        """Decoded images [b, S, S, 1] -> augmented (training), as the batch holds them."""
        if self.warp_from_source:  # The geometric part is done (decode).
            images = photometric(images, positions, self.seed, self.augment, stream=stream)
        elif self.train:
            images = augment_images(images, positions, self.seed, self.augment, stream=stream)
        return to_batch_images(images, self.data_config)
