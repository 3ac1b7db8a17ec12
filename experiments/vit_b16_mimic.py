"""The reference recipe: ViT-B/16 at 224x224 + 12-layer text tower, global batch 4096, bf16.

Meant for a pod slice (e.g. TPU v4-64 or 8 nodes x 8 H100) on MIMIC-CXR shards.
`runlocal` shrinks it to something that runs on a laptop.
"""

import ml_collections

from input_pipeline.findings import CHEXPERT_FINDINGS
from jaxmedclip import config_lib, evaluation


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, runlocal=False, loss_impl="ring", loss_tile=1024)
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.total_steps = 40_000
    config.global_batch_size = 4096
    config.log_every = 50
    config.checkpoint_every = 1000
    config.checkpoint_keep = 3  # The last K checkpoints are kept...
    # ...plus the best `checkpoint_keep_best` by this eval metric (None: off), e.g.
    # "eval/zero_shot_mean_auc"; checkpoints are then also saved at every eval.
    config.checkpoint_best_metric = None
    config.checkpoint_best_mode = "max"
    config.checkpoint_keep_best = 1

    # GradCache: embed the global batch in micro-batches of this size (None: all at once).
    config.microbatch_size = None
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

    config.data = ml_collections.ConfigDict()
    # MIMIC-CXR from its manual-download layout (input_pipeline/README.md, "Bring your own
    # data"): built once into ArrayRecord shards under data_dir, then read by index.
    config.data.name = "mimic_cxr"
    config.data.manual_dir = None  # The folder holding files/ and the metadata CSVs.
    config.data.reports_dir = None  # None: the reports are under manual_dir/files too.
    config.data.data_dir = None  # None: $JAXMEDCLIP_DATA_DIR or ~/.cache/jaxmedclip/tfds.
    config.data.source_max_size = 512  # Longest side stored in the shards (16-bit PNG).
    config.data.views = None  # e.g. ("PA", "AP") for frontal views only.
    config.data.build_max_bad_fraction = 0.01  # Unreadable rows tolerated at build time.
    config.data.build_workers = None  # None: every CPU.
    config.data.max_bad_fraction = 0.01  # Undecodable examples tolerated while reading.
    config.data.image_size = 224
    config.data.image_mean = 0.5
    config.data.image_std = 0.25
    config.data.image_dtype = "float32"  # Or "uint16": normalised on the device, half the bytes.
    # A random subset of the report's sentences, shuffled (CXR-CLIP style); evaluation
    # reads the whole findings + impression text.
    config.data.text = "sentences"
    config.data.max_text_len = 128
    config.data.vocab_size = 32_000
    config.data.tokenizer_type = "bpe"  # Exported tokenizers reproduce BPE ids exactly.
    config.data.augment = ml_collections.ConfigDict(
        dict(
            crop_scale=(0.7, 1.0),
            crop_aspect=(3 / 4, 4 / 3),
            rotation_degrees=5.0,
            brightness=0.1,
            contrast=0.1,
            gamma=0.1,
            horizontal_flip=False,  # Laterality is in the reports.
        )
    )

    config.model = ml_collections.ConfigDict()
    config.model.name = "two_tower"
    config.model.embed_dim = 512
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"
    # Throughput switches (each computes the same function; docs/benchmarks.md, "Throughput
    # on one GPU"). These are the settings measured at 0.22-0.24 MFU on an H200;
    # `bash benchmarks/gpu_compare.sh` compares them with the fast ones (cuDNN attention,
    # remat_policy="save_dots", image_dtype="uint16"), not yet run on a GPU.
    config.model.remat = True
    config.model.remat_policy = None  # None: `remat` decides ("full").
    config.model.scan_layers = True
    # jax.nn.dot_product_attention's implementation: None (XLA) or "cudnn" (fused, NVIDIA
    # GPUs, bf16; lengths padded to even inside the call).
    config.model.attention_impl = None
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
            pre_norm=True,  # CLIP's layout, so that export --format clip applies.
        )
    )
    config.model.text = ml_collections.ConfigDict(
        dict(name="transformer", variant="causal", width=512, depth=12, num_heads=8, mlp_ratio=4.0)
    )

    # Tiles of 1,024: at 8 or more devices (per-device batch <= 512) one tile is the whole
    # ring block, exactly the untiled step; on fewer devices or at a larger global batch the
    # loss stays O(per-device batch x dim) in memory, and a 1,024 x 512 x 1,024 tile matmul
    # is still large enough to keep an accelerator's matrix units busy (docs/benchmarks.md).
    config.loss = ml_collections.ConfigDict(dict(
        name="softmax", impl=arg.loss_impl,
        tile_size=arg.loss_tile if arg.loss_impl == "ring" else 0, matmul_inputs="float32"))

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

    config.eval = evaluation.default_config()
    config.eval.every_steps = 2000
    config.eval.zero_shot_findings = CHEXPERT_FINDINGS
    config.eval.probe_max_train_examples = 50_000

    if arg.runlocal:  # The same recipe, shrunk, on the built-in synthetic data.
        config.data.name = "synthetic_cxr"
        config.data.synthetic = ml_collections.ConfigDict(
            dict(num_train=256, num_validation=64, num_test=64, source_image_size=128, seed=0)
        )
        config.data.tokenizer_type = "bpe"
        config.optim.warmup_steps = 2
        config.eval.every_steps = 0
        config.eval.batch_size = 32
        config.eval.zero_shot_findings = evaluation.default_config().zero_shot_findings
        config.total_steps = 10
        config.global_batch_size = 16
        config.data.image_size = 32
        config.data.vocab_size = 512
        config.data.max_text_len = 32
        config.model.image.update(dict(width=64, depth=2, num_heads=2))
        config.model.text.update(dict(width=64, depth=2, num_heads=2))
        config.model.embed_dim = 64
    return config
