"""Analytic FLOP counts of the two-tower model and chip peaks, for TFLOPs and MFU logging.

Counts are model FLOPs (as in the MFU convention): multiply-adds of the matrix products
counted as 2 FLOPs, training = 3 x forward (forward + two matmuls per matmul backward);
recomputation by remat is not counted. Element-wise work (norms, softmax, GELU) is left out.
"""

from __future__ import annotations

import ml_collections

# Dense bfloat16 peak TFLOP/s per chip (per device as JAX sees it).
PEAK_TFLOPS = {
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,  # v5e
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v5": 459.0,
    "TPU v6 lite": 918.0,  # v6e (Trillium)
    "TPU v6e": 918.0,
    "A100": 312.0,
    "H100": 989.0,  # SXM; the PCIe card below.
    "H100 PCIe": 756.0,
    "H200": 989.0,
}


def _encoder_forward(tokens: int, width: int, depth: int, mlp_ratio: float) -> float:
    mlp = int(width * mlp_ratio)
    per_layer = 2 * tokens * (4 * width * width + 2 * width * mlp)  # qkv, out, mlp
    per_layer += 2 * 2 * tokens * tokens * width  # scores and weighted values
    return depth * per_layer


def forward_flops_per_example(config: ml_collections.ConfigDict) -> float:
    """Forward FLOPs of one image-report pair (both towers, projections and the loss row);
    with `loss.multiview`, of its two views and two texts and the row of every term."""
    data, model = config.data, config.model
    image, text = model.image, model.text
    patches = (data.image_size // image.patch_size) ** 2
    image_tokens = patches + (1 if image.pool == "cls" else 0)
    flops = 2 * patches * image.patch_size**2 * image.num_channels * image.width
    flops += _encoder_forward(image_tokens, image.width, image.depth, image.mlp_ratio)
    if image.pool == "map":
        flops += 2 * (3 * image_tokens + 1) * image.width * image.width
    flops += _encoder_forward(data.max_text_len, text.width, text.depth, text.mlp_ratio)
    flops += 2 * model.embed_dim * (image.width + text.width)
    loss_terms = 1
    multiview = config.loss.multiview
    if multiview is not None:
        flops *= 2  # Both towers run on the second view and text too.
        loss_terms = 4 + sum(multiview[f"{name}_weight"] > 0
                             for name in ("image_image", "text_text"))
    # One row and one column of the global [B, B] logit matrix per example and term.
    flops += loss_terms * 2 * 2 * config.global_batch_size * model.embed_dim
    return float(flops)


def train_flops_per_step(config: ml_collections.ConfigDict) -> float:
    return 3.0 * forward_flops_per_example(config) * config.global_batch_size


def peak_tflops(device_kind: str) -> float | None:
    """The chip's dense bf16 peak, or None when unknown (e.g. CPU)."""
    for name, peak in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if name.lower() in device_kind.lower():
            return peak
    return None
