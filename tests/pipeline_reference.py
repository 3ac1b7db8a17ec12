"""What several input-pipeline tests share: a small synthetic data config, and one
training image computed alone."""

import ml_collections
import tensorflow as tf

from input_pipeline.augment import AugmentConfig, source_warps, warp_source


def synthetic_data_config(data_dir, **overrides) -> ml_collections.ConfigDict:
    """`data` of a 24/4/4-study synthetic dataset of 32-pixel images under `data_dir`."""
    return ml_collections.ConfigDict({**dict(
        name="synthetic_cxr", data_dir=str(data_dir),
        synthetic=dict(num_train=24, num_validation=4, num_test=4, source_image_size=32,
                       seed=0),
        image_size=32, image_mean=0.5, image_std=0.25, text="report", max_text_len=48,
        vocab_size=256, tokenizer_type="unigram"), **overrides})


def warp_from_source(image: tf.Tensor, position, seed: int, config: AugmentConfig, size: int,
                     stream: int = 0) -> tf.Tensor:
    """A decoded source [h, w, C] warped as training warps example `position`: the
    pipeline's two steps (`source_warps`, batched in training; `warp_source`, per image)
    for one image whose size is read from the decoded pixels instead of the PNG header."""
    shape = tf.shape(image)
    warps = source_warps(tf.reshape(tf.cast(position, tf.int64), [1]), seed, config, size,
                         shape[None, 0], shape[None, 1], stream)
    return warp_source(image, {k: v[0] for k, v in warps.items()}, size)
