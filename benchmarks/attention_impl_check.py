"""Compares the fused (cuDNN) and XLA attention paths on the same weights and inputs.

  python benchmarks/attention_impl_check.py [--config experiments/vit_b16_mimic.py]

Builds the config's model twice (model.attention_impl "xla" and "cudnn"), applies both to
the same random images and right-padded token rows (varied lengths), and prints the
largest absolute difference of the image and text embeddings (bf16 compute: expect about
1e-2 or less on unit-norm embeddings). Needs an NVIDIA GPU.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="experiments/vit_b16_mimic.py")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    import jax
    import numpy as np

    from jaxmedclip import config_lib, models

    config = config_lib.load_config(args.config)
    rng = np.random.default_rng(0)
    size, length = config.data.image_size, config.data.max_text_len
    images = rng.normal(size=(args.batch, size, size, config.model.image.num_channels))
    tokens = np.zeros((args.batch, length), np.int32)
    for i in range(args.batch):
        n = int(rng.integers(4, length + 1))
        tokens[i, : n - 1] = rng.integers(4, config.data.vocab_size, n - 1)
        tokens[i, n - 1] = models.EOS_ID
    images = images.astype(np.float32)
    outputs = {}
    variables = None
    for impl in ("xla", "cudnn"):
        config.model.attention_impl = impl
        model = models.build_model(config.model, config.data)
        if variables is None:
            variables = jax.jit(model.init)(jax.random.key(0), images, tokens)
        outputs[impl] = jax.device_get(jax.jit(model.apply)(variables, images, tokens))
    for name in ("image_emb", "text_emb"):
        diff = np.abs(
            outputs["xla"][name].astype(np.float32) - outputs["cudnn"][name].astype(np.float32)
        ).max()
        print(f"{name}_max_abs_diff={diff:.3g}")


if __name__ == "__main__":
    main()
