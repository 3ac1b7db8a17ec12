"""A small CLIP on the built-in synthetic chest X-ray data; learns on CPU in minutes.

python -m jaxmedclip.train --config experiments/tiny_synthetic.py --workdir /tmp/tiny
python -m jaxmedclip.train --config experiments/tiny_synthetic.py:runlocal --workdir ...
"""

import ml_collections

from jaxmedclip import config_lib, evaluation


def get_config(arg=None):
    arg = config_lib.parse_arg(
        arg, runlocal=False, loss_impl="all_gather", total_steps=1000, targets="multi_positive"
    )
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.total_steps = arg.total_steps
    config.global_batch_size = 64
    config.log_every = 10
    config.checkpoint_every = 0  # 0: only at the end.

    # GradCache: embed the global batch in micro-batches of this size (None: all at once).
    config.microbatch_size = None
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

    config.data = ml_collections.ConfigDict()
    config.data.name = "synthetic_cxr"
    config.data.data_dir = None  # None: $JAXMEDCLIP_DATA_DIR or ~/.cache/jaxmedclip/tfds.
    config.data.synthetic = ml_collections.ConfigDict(
        dict(num_train=4096, num_validation=512, num_test=1024, source_image_size=128, seed=0)
    )
    config.data.image_size = 64
    config.data.image_mean = 0.5
    config.data.image_std = 0.25
    config.data.text = "report"  # report | findings | impression
    config.data.max_text_len = 48
    config.data.vocab_size = 512
    # BPE keeps whole words of the small synthetic vocabulary (unigram splits them).
    config.data.tokenizer_type = "bpe"
    config.data.shuffle_buffer = 4096

    config.model = ml_collections.ConfigDict()
    config.model.name = "two_tower"
    config.model.embed_dim = 96
    config.model.dtype = "float32"
    config.model.param_dtype = "float32"
    config.model.remat = False
    config.model.scan_layers = False
    config.model.temperature_init = 1 / 0.07
    config.model.max_scale = 100.0
    config.model.bias_init = -10.0
    config.model.image = ml_collections.ConfigDict(
        dict(
            name="vit",
            patch_size=8,
            width=96,
            depth=3,
            num_heads=3,
            mlp_ratio=4.0,
            pool="cls",
            num_channels=1,
        )
    )
    config.model.text = ml_collections.ConfigDict(
        dict(name="transformer", variant="causal", width=96, depth=2, num_heads=3, mlp_ratio=4.0)
    )

    # On 8 fake CPU devices the ring's 8 sequential hops cost more than they save (0.55 s vs
    # 0.30 s a step measured here); pod-scale configs use `ring`.
    config.loss = ml_collections.ConfigDict(
        dict(name="softmax", impl=arg.loss_impl, targets=arg.targets, multi_positive_key="text_id")
    )

    config.optim = ml_collections.ConfigDict(
        dict(
            name="adamw",
            learning_rate=2e-3,
            weight_decay=0.1,
            b1=0.9,
            b2=0.98,
            eps=1e-6,
            warmup_steps=30,
            schedule="cosine",
            grad_clip_norm=1.0,
        )
    )

    config.eval = evaluation.default_config()
    config.eval.every_steps = 500
    config.eval.batch_size = 256

    if arg.runlocal:
        config.total_steps = 20
        config.global_batch_size = 32
        config.log_every = 5
        config.data.synthetic.num_train = 256
        config.data.synthetic.num_validation = 64
        config.data.synthetic.num_test = 64
        config.model.image.depth = 2
        config.optim.warmup_steps = 5
        config.eval.every_steps = 0
        config.eval.batch_size = 32
        config.eval.bootstrap_samples = 100
    return config
