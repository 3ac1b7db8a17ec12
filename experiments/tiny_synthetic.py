"""A small CLIP on the built-in synthetic chest X-ray data; learns on CPU in minutes.

python -m jaxmedclip.train --config experiments/tiny_synthetic.py --workdir /tmp/tiny
python -m jaxmedclip.train --config experiments/tiny_synthetic.py:runlocal --workdir ...

Option `recipe`:
  "cxrclip" (the default): experiments/cxrclip_synthetic.py's CXR-CLIP multi-view
      training (two views, two texts, image-image and text-text terms) plus normal studies
      as positives of each other (`loss.multi_positive_key="text_id,no_finding"`), almost
      no augmentation, 850 steps: the best recipe we have for a 15-minute CPU budget
      (README "What to expect"; docs/ablation.md). Plus a local term for grounding
      (`local_weight`, 0: off): region features of small windows from a head of their
      own, aligned with each text by attention pooling (docs/applications.md
      "Grounding").
  "clip": plain CLIP (multi-positive by equal text), 2,000 steps: the baseline of the
      ablation, and what `runlocal` (the tests' config) uses unless `recipe=cxrclip`.
`total_steps=0` (the default) takes the recipe's step count.
"""

import os

import ml_collections

from input_pipeline.synthetic_cxr import LOBES  # The lung regions the reports name.
from jaxmedclip import config_lib, evaluation

CXRCLIP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cxrclip_synthetic.py")
RECIPE_STEPS = {"cxrclip": 850, "clip": 2000}

SYNTHETIC_PROMPTS = {  # slug -> (positive prompts, negative prompts)
    "no_finding": (
        ("no acute cardiopulmonary process.", "the lungs are clear."),
        (
            "cardiomegaly.",
            "pleural effusion.",
            "pneumothorax.",
            "pulmonary edema.",
            "focal consolidation.",
            "airspace opacity.",
            "support devices in standard position.",
        ),
    ),
    "cardiomegaly": (
        ("the heart is enlarged.", "there is moderate cardiomegaly.", "cardiomegaly."),
        (
            "heart size is normal.",
            "the heart is not enlarged.",
            "the cardiac silhouette is normal in size.",
        ),
    ),
    "lung_opacity": (
        tuple(f"{lobe} opacity." for lobe in LOBES)
        + tuple(f"there is a moderate-sized airspace opacity in the {lobe}." for lobe in LOBES),
        ("the lungs are clear.", "no focal opacity."),
    ),
    "edema": (
        (
            "moderate pulmonary edema.",
            "there is mild interstitial pulmonary edema.",
            "pulmonary edema.",
        ),
        ("no pulmonary edema.", "there is no pulmonary edema."),
    ),
    "consolidation": (
        tuple(f"{lobe} consolidation." for lobe in LOBES)
        + tuple(f"there is focal consolidation in the {lobe}." for lobe in LOBES),
        ("no focal consolidation.", "the lungs are clear without focal consolidation."),
    ),
    "pneumothorax": (
        tuple(
            f"there is a {size} {side} pneumothorax."
            for size in ("small", "moderate", "large")
            for side in ("right", "left")
        ),
        ("no pneumothorax.", "there is no pneumothorax."),
    ),
    "pleural_effusion": (
        (
            "there is a moderate right-sided pleural effusion.",
            "small left pleural effusion.",
            "bilateral pleural effusions.",
        ),
        ("no pleural effusion.", "there is no pleural effusion."),
    ),
    "support_devices": (
        (  # One per device the reports describe, then the impression's summary.
            "endotracheal tube terminates 4 cm above the carina.",
            "right internal jugular central venous catheter terminates in the mid svc.",
            "left subclavian central venous catheter tip projects over the svc.",
            "nasogastric tube tip is in the stomach.",
            "left-sided pacemaker device with leads in standard position.",
            "support devices in standard position.",
        ),
        ("the lungs are clear.", "no acute cardiopulmonary process."),
    ),
}


def add_grounding_term(config, weight: float) -> None:
    """The local term that teaches where findings lie (evaluate's grounding section).

    The transformer's patch tokens all see the whole image, so their similarity to a phrase
    does not say where its finding is (test pointing game 0.09, below the 0.46 of a map
    that knows only where each finding usually lies). Here a head of its own describes
    each window (every 4 pixels, with its position) by a small CNN that sees 9 pixels
    (`local_head_stem="conv"`: a linear window embedding sees edges, not the flat texture
    inside a finding) and gives it two region features: one of the window alone (kernel
    1) and one that also sees the neighbouring windows (kernel 3: 17 pixels). Each text
    pools the regions of every image of the batch by its attention,
    softmax_p(t1 * cos(region, text)) (`local_text="sentence"`), contrasted like the
    global loss: a finding's text can only match an image through the windows that show
    it. t1 = 5: at 10 the attention is nearly a maximum, the first window to win (often a
    finding's edge, just outside it) keeps winning, and which one that is depends on the
    seed (test pointing game 0.88 or 0.57); at 5 every window of the finding shares the
    gradient (seeds 0, 1, 2: 0.84, 0.83, 0.77). Maps are spread over each window's
    pixels (evaluation's `grounding.map_spread`). The variants measured:
    docs/applications.md "Grounding".
    """
    config.model.local_dim = 64
    config.model.local_source = "patches"
    config.model.local_text = "sentence"
    config.model.local_head_stem = "conv"
    config.model.local_head_stride = 4
    config.model.local_head_kernels = (1, 3)
    config.model.local_head_depth = 1
    config.loss.local = ml_collections.ConfigDict(dict(weight=weight, t1=5.0, t3=10.0))


def get_config(arg=None):
    arg = config_lib.parse_arg(
        arg, runlocal=False, loss_impl="all_gather", total_steps=0, targets="multi_positive",
        recipe="", local_weight=1.0,
    )
    recipe = arg.recipe or ("clip" if arg.runlocal else "cxrclip")
    if recipe not in RECIPE_STEPS:
        raise ValueError(f"recipe={arg.recipe!r} is unknown; choose one of {list(RECIPE_STEPS)}")
    steps = arg.total_steps or RECIPE_STEPS[recipe]
    if recipe == "cxrclip":  # cxrclip_synthetic.py loads this file's "clip" recipe.
        config = config_lib.load_config(
            f"{CXRCLIP}:runlocal={arg.runlocal},loss_impl={arg.loss_impl},"
            f"total_steps={steps},targets={arg.targets}"
        )
        if arg.targets == "multi_positive":
            # Two normal studies are positives whatever their reports' wording: without
            # this, normal images rank hedged near-normal reports above the normal ones.
            config.loss.multi_positive_key = "text_id,no_finding"
        # Only a full-area crop of random aspect (3/4 to 4/3: each side keeps >= 87%), no
        # rotation and no brightness/contrast jitter: cxrclip_synthetic's augmentation
        # (crop 0.7-1, 5 degrees, jitter 0.1) cost pneumothorax and support devices
        # most of their AUC (test zero-shot 0.895 -> 0.922; docs/ablation.md).
        config.data.augment = ml_collections.ConfigDict(dict(crop_scale=(1.0, 1.0)))
        if arg.local_weight:
            add_grounding_term(config, arg.local_weight)
        if not arg.runlocal:
            config.eval.every_steps = steps // 2
        return config
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.total_steps = steps
    config.global_batch_size = 64
    config.log_every = 10
    config.checkpoint_every = 0  # 0: only at the end.
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
    config.data.name = "synthetic_cxr"
    config.data.data_dir = None  # None: $JAXMEDCLIP_DATA_DIR or ~/.cache/jaxmedclip/tfds.
    config.data.synthetic = ml_collections.ConfigDict(
        dict(num_train=4096, num_validation=512, num_test=1024, source_image_size=128, seed=0)
    )
    config.data.image_size = 64
    config.data.image_mean = 0.5
    config.data.image_std = 0.25
    # report | findings | impression | sentences. "sentences": 1-3 of the report's
    # sentences, shuffled, or (30%) the whole report; evaluation reads whole reports. Short
    # texts teach the small text tower what each sentence means, which the one-sentence
    # zero-shot prompts need.
    config.data.text = "sentences"
    config.data.max_sentences = 3
    config.data.full_report_prob = 0.3
    config.data.max_text_len = 48
    config.data.vocab_size = 512
    # BPE keeps whole words of the small synthetic vocabulary (unigram splits them).
    config.data.tokenizer_type = "bpe"

    config.model = ml_collections.ConfigDict()
    config.model.name = "two_tower"
    config.model.embed_dim = 96
    config.model.dtype = "float32"
    config.model.param_dtype = "float32"
    config.model.remat = False
    config.model.scan_layers = False
    config.model.attention_impl = None  # jax.nn.dot_product_attention: None/"xla"/"cudnn".
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
            pre_norm=True,  # CLIP's layout: the model exports as a transformers CLIPModel.
        )
    )
    config.model.text = ml_collections.ConfigDict(
        dict(name="transformer", variant="causal", width=96, depth=2, num_heads=3, mlp_ratio=4.0)
    )

    # On 8 fake CPU devices the ring's 8 sequential hops cost more than they save (0.55 s vs
    # 0.30 s a step measured here); pod-scale configs use `ring`.
    config.loss = ml_collections.ConfigDict(
        dict(name="softmax", impl=arg.loss_impl, targets=arg.targets, multi_positive_key="text_id",
             # In-device tiles of the ring loss (0: untiled); see docs/methods.md.
             tile_size=0, matmul_inputs="float32")
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
    # The tiny text tower knows only the phrasing of the synthetic reports, so its prompts
    # are written in that phrasing (graded sizes, "heart size is normal"), as radiologists
    # write; a large model trained on real reports can use the generic defaults.
    for finding, (positive, negative) in SYNTHETIC_PROMPTS.items():
        config.eval.prompts.positive[finding] = positive
        config.eval.prompts.negative[finding] = negative
    config.eval.every_steps = 1000
    config.eval.batch_size = 256

    if arg.runlocal:
        config.data.text = "report"  # Learns faster in a few steps (tests check the loss).
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
