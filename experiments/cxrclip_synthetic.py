"""tiny_synthetic with CXR-CLIP's multi-view training: two views and two texts per study.

Each training example brings a second image (the study's other view, PA <-> LATERAL,
or for a one-view study a second augmentation of its image) and a second text
(`data.multiview`, input_pipeline/stages/views.py). The loss is CXR-CLIP's
(`loss.multiview`, jaxmedclip/methods/multiview.py):

  loss = 1.0 * mean of the four image-text terms C(x_a, t_b)
         + 1.0 * C(x1, x2)  (image-image)  + 0.5 * C(t1, t2)  (text-text)

each C a global contrastive loss with negatives from the whole global batch. Texts
(option `texts`): "findings_impression" (default: FINDINGS against IMPRESSION, each a
sentence sample under tiny_synthetic's data.text="sentences", whole sections under
runlocal's "report") or "resample" (two sentence samples of the report; runlocal then
keeps data.text="sentences"). Option `prompt_fraction` (default 0): that share of every
global batch reads its labels written as text instead of its report (CXR-CLIP's
labels-as-text; `data.decoupled`, input_pipeline/label_prompts.py), both texts then
being prompt draws; label-only records (none in the synthetic data) always do.

Everything else is tiny_synthetic's "clip" recipe (loaded from the file beside this one,
so the two stay in sync; tiny_synthetic's default recipe is this one plus normal studies
as positives), plus the augmentation a one-view study needs for its second image:

python -m jaxmedclip.train --config experiments/cxrclip_synthetic.py --workdir /tmp/cxrclip
python -m jaxmedclip.train --config experiments/cxrclip_synthetic.py:runlocal --workdir ...
"""

import os

import ml_collections

from jaxmedclip import config_lib

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_synthetic.py")


def get_config(arg=None):
    arg = config_lib.parse_arg(
        arg,
        runlocal=False,
        loss_impl="all_gather",
        total_steps=700,
        targets="multi_positive",
        texts="findings_impression",
        image_image_weight=1.0,
        text_text_weight=0.5,
        prompt_fraction=0.0,
    )
    config = config_lib.load_config(
        f"{BASE}:recipe=clip,runlocal={arg.runlocal},loss_impl={arg.loss_impl},"
        f"total_steps={arg.total_steps},targets={arg.targets}"
    )
    config.data.multiview = True
    config.data.multiview_texts = arg.texts
    if arg.texts == "resample":
        config.data.text = "sentences"  # Two samples need a random text source.
    # Mild geometry and intensity changes: a one-view study's two images must differ.
    config.data.augment = ml_collections.ConfigDict(
        dict(crop_scale=(0.7, 1.0), rotation_degrees=5.0, brightness=0.1, contrast=0.1)
    )
    if arg.prompt_fraction:
        config.data.decoupled = ml_collections.ConfigDict(
            dict(label_prompt_fraction=arg.prompt_fraction)
        )
    config.loss.multiview = ml_collections.ConfigDict(
        dict(
            image_text_weight=1.0,
            image_image_weight=arg.image_image_weight,
            text_text_weight=arg.text_text_weight,
            image_text_reduction="mean",
        )
    )
    return config
