"""The reference recipe: ViT-B/16 at 224x224 + 12-layer text tower, global batch 4096, bf16.

Meant for a pod slice (e.g. TPU v4-64 or 8 nodes x 8 H100) on MIMIC-CXR shards.
`runlocal` shrinks it to something that runs on a laptop.
"""

import ml_collections

from jaxmedclip import config_lib


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, runlocal=False, loss_impl="ring")
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.total_steps = 40_000
    config.global_batch_size = 4096
    config.log_every = 50
    config.checkpoint_every = 1000

    # GradCache: embed the global batch in micro-batches of this size (None: all at once).
    config.microbatch_size = None
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

    config.data = ml_collections.ConfigDict()
    config.data.name = "mimic_cxr"
    config.data.data_dir = None
    config.data.image_size = 224
    config.data.image_mean = 0.5
    config.data.image_std = 0.25
    config.data.text = "report"
    config.data.max_text_len = 128
    config.data.vocab_size = 32_000
    config.data.tokenizer_type = "unigram"
    config.data.shuffle_buffer = 50_000

    config.model = ml_collections.ConfigDict()
    config.model.name = "two_tower"
    config.model.embed_dim = 512
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"
    config.model.remat = True
    config.model.scan_layers = True
    config.model.temperature_init = 1 / 0.07
    config.model.max_scale = 100.0
    config.model.bias_init = -10.0
    config.model.image = ml_collections.ConfigDict(
        dict(
            name="vit",
            patch_size=16,
            width=768,
            depth=12,
            num_heads=12,
            mlp_ratio=4.0,
            pool="cls",
            num_channels=1,
        )
    )
    config.model.text = ml_collections.ConfigDict(
        dict(name="transformer", variant="causal", width=512, depth=12, num_heads=8, mlp_ratio=4.0)
    )

    config.loss = ml_collections.ConfigDict(dict(name="softmax", impl=arg.loss_impl))

    config.optim = ml_collections.ConfigDict(
        dict(
            name="adamw",
            learning_rate=5e-4,
            weight_decay=0.2,
            b1=0.9,
            b2=0.98,
            eps=1e-6,
            warmup_steps=2000,
            schedule="cosine",
            grad_clip_norm=1.0,
        )
    )

    if arg.runlocal:
        config.total_steps = 10
        config.global_batch_size = 16
        config.data.image_size = 32
        config.data.vocab_size = 512
        config.data.max_text_len = 32
        config.model.image.update(dict(width=64, depth=2, num_heads=2))
        config.model.text.update(dict(width=64, depth=2, num_heads=2))
        config.model.embed_dim = 64
    return config
