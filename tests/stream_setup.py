"""The small model, configs and host batches the streamed-GradCache tests share (the
test module and the two-process worker): nothing here needs tensorflow."""

import os

import numpy as np

from jaxmedclip import config_lib, vocabulary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLOBAL_BATCH = 64
MICRO = 8
STEPS = 2


EXPERIMENTS = {  # method -> experiment (runlocal: the tests' sizes)
    "clip": "tiny_synthetic.py:runlocal",
    "multiview": "cxrclip_synthetic.py:runlocal",
    "gloria": "gloria_synthetic.py:runlocal",
    "medclip_text_only": "medclip_synthetic.py:runlocal,text_fraction=0.25",
}


def small_config(*, stream: bool, micro: int | None = MICRO, method: str = "clip",
                 global_batch: int = GLOBAL_BATCH, overrides=()):
    """The method's experiment (runlocal) with a model that compiles in seconds;
    `stream`: micro-batches of `micro` streamed from the host."""
    spec = EXPERIMENTS[method]
    fields = [
        f"global_batch_size={global_batch}", f"microbatch_size={micro}",
        f"stream_microbatches={stream}", "data.image_size=32", "data.max_text_len=16",
        "model.embed_dim=32", "model.image.width=64", "model.image.num_heads=2",
        "model.image.depth=1", "model.text.width=64", "model.text.num_heads=2",
        "model.text.depth=1", "optim.warmup_steps=0", "loss.impl=ring",
        # AdamW divides by sqrt(v) + eps: with the recipe's 1e-6 a parameter whose gradient
        # is ~1e-7 (a rare token's embedding) moves by a sign-like step that float
        # summation order can flip; 1e-3 keeps the comparison about the gradients.
        "optim.eps=1e-3", *overrides,
    ]
    return config_lib.config_from_flags(os.path.join(REPO, "experiments", spec), fields)


def host_batches(config, steps: int = STEPS, seed: int = 0):
    """`steps` global batches as the input pipeline would yield them (numpy, whole):
    every field of `batch_schema.batch_fields`, with token rows BOS ... EOS PAD, labels in
    {-1, 0, 1}, repeated ids (multi-positive pairs) and, with `data.decoupled`, a quarter
    of the rows text-only (no image) and an eighth label prompts."""
    from jaxmedclip import batch_schema

    rng = np.random.default_rng(seed)
    b, length = config.global_batch_size, config.data.max_text_len
    fields = batch_schema.batch_fields(config.data, b, train=True)

    def token_rows():
        lengths = rng.integers(4, length + 1, b)
        tokens = rng.integers(4, config.data.vocab_size, (b, length)).astype(np.int32)
        tokens[:, 0] = vocabulary.BOS_ID
        tokens[np.arange(b), lengths - 1] = vocabulary.EOS_ID
        tokens[np.arange(length)[None, :] >= lengths[:, None]] = vocabulary.PAD_ID
        return tokens

    out = []
    for _ in range(steps):
        batch = {}
        for name, (shape, dtype) in fields.items():
            if name in ("image", "image2"):
                value = rng.normal(size=shape)
            elif name in ("tokens", "tokens2"):
                value = token_rows()
            elif name in ("study_id", "text_id", "text_id2"):
                value = rng.integers(0, b // 2, shape)
            elif name == "labels":
                value = rng.integers(-1, 2, shape)
            elif name == "num_skipped":
                value = np.zeros(shape)
            elif name == "image_mask":
                value = np.arange(b) % 4 != 3  # Text-only rows: no image.
            elif name == "label_prompt":
                value = np.arange(b) % 8 == 1
            else:  # mask, labels_present, text_mask
                value = np.ones(shape)
            batch[name] = np.asarray(value).astype(dtype)
        out.append(batch)
    return out
