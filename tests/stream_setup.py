"""The small model, configs and host batches the streamed-GradCache tests share (the
test module and the two-process worker): nothing here needs tensorflow."""

import os

import numpy as np

from jaxmedclip import config_lib, vocabulary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLOBAL_BATCH = 64
MICRO = 8
STEPS = 2


def small_config(*, stream: bool, micro: int | None = MICRO, multiview: bool = False,
                 global_batch: int = GLOBAL_BATCH, overrides=()):
    """tiny_synthetic's runlocal (or cxrclip_synthetic's) with a model that compiles in
    seconds; `stream`: micro-batches of `micro` streamed from the host."""
    spec = "cxrclip_synthetic.py:runlocal" if multiview else "tiny_synthetic.py:runlocal"
    fields = [
        f"global_batch_size={global_batch}", f"microbatch_size={micro}",
        f"stream_microbatches={stream}", "data.image_size=32", "data.max_text_len=16",
        "model.embed_dim=32", "model.image.width=64", "model.image.num_heads=2",
        "model.image.depth=1", "model.text.width=64", "model.text.num_heads=2",
        "model.text.depth=1", "optim.warmup_steps=0", "loss.impl=ring", *overrides,
    ]
    return config_lib.config_from_flags(os.path.join(REPO, "experiments", spec), fields)


def host_batches(config, steps: int = STEPS, seed: int = 0):
    """`steps` global batches as the input pipeline would yield them (numpy, whole)."""
    rng = np.random.default_rng(seed)
    b, size, length = config.global_batch_size, config.data.image_size, config.data.max_text_len
    out = []
    for _ in range(steps):
        lengths = rng.integers(4, length + 1, b)
        tokens = rng.integers(4, config.data.vocab_size, (b, length)).astype(np.int32)
        tokens[:, 0] = vocabulary.BOS_ID
        tokens[np.arange(b), lengths - 1] = vocabulary.EOS_ID
        tokens[np.arange(length)[None, :] >= lengths[:, None]] = vocabulary.PAD_ID
        batch = {
            "image": rng.normal(size=(b, size, size, 1)).astype(np.float32),
            "tokens": tokens,
            "study_id": rng.integers(0, b // 2, b).astype(np.int32),
            "text_id": rng.integers(0, b // 2, b).astype(np.int32),
            "labels": rng.integers(-1, 2, (b, vocabulary.NUM_FINDINGS)).astype(np.float32),
            "labels_present": np.ones((b, vocabulary.NUM_FINDINGS), bool),
            "mask": np.ones(b, bool),
            "num_skipped": np.zeros(b, np.int32),
        }
        if config.data.multiview:
            batch["image2"] = rng.normal(size=(b, size, size, 1)).astype(np.float32)
            batch["tokens2"] = np.roll(tokens, 1, axis=0)
            batch["text_id2"] = np.roll(batch["text_id"], 1)
        out.append(batch)
    return out
