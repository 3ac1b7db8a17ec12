"""A reference for the input-pipeline tests: one training image computed alone."""

import tensorflow as tf

from input_pipeline.augment import AugmentConfig, source_warps, warp_source


def warp_from_source(image: tf.Tensor, position, seed: int, config: AugmentConfig, size: int,
                     stream: int = 0) -> tf.Tensor:
    """A decoded source [h, w, C] warped as training warps example `position`: the
    pipeline's two steps (`source_warps`, batched in training; `warp_source`, per image)
    for one image whose size is read from the decoded pixels instead of the PNG header."""
    shape = tf.shape(image)
    warps = source_warps(tf.reshape(tf.cast(position, tf.int64), [1]), seed, config, size,
                         shape[None, 0], shape[None, 1], stream)
    return warp_source(image, {k: v[0] for k, v in warps.items()}, size)
