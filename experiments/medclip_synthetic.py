"""tiny_synthetic with MedCLIP-style semantic matching: soft targets from label similarity.

The target of image i over the reports j of the global batch is softmax_j(cos(labels_i,
labels_j) / T) (`loss.targets="soft_labels"`, T = `loss.soft_target_temperature`), so
two studies with the same findings are no longer pushed apart as negatives. Examples
without any label (an all-blank row) keep a one-hot target. The batch's `labels`
[b, 14] (1 / 0 / -1, blanks 0) come from the input pipeline.

Option `prompt_fraction` (default 0): that share of every global batch are image-label
examples, their text the labels written as text (MedCLIP's decoupled image-label data;
`data.decoupled`, input_pipeline/label_prompts.py). Option `text_fraction` (default 0):
that share are text-label examples, a report whose image is masked out of the loss
(`image_mask`), matched to the batch's images by label similarity alone (MedCLIP's
decoupled text-label data; the image still runs through the tower).

Everything else is tiny_synthetic's (loaded from the file beside this one, so the two
stay in sync):

python -m jaxmedclip.train --config experiments/medclip_synthetic.py --workdir /tmp/medclip
python -m jaxmedclip.train --config experiments/medclip_synthetic.py:runlocal --workdir ...
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
        total_steps=1000,
        temperature=0.1,
        prompt_fraction=0.0,
        text_fraction=0.0,
    )
    base_arg = (f"recipe=clip,runlocal={arg.runlocal},loss_impl={arg.loss_impl},"
                f"total_steps={arg.total_steps}")
    config = config_lib.load_config(f"{BASE}:{base_arg},targets=soft_labels")
    # MedCLIP's semantic-matching temperature on the label cosines.
    config.loss.soft_target_temperature = arg.temperature
    if arg.prompt_fraction or arg.text_fraction:
        config.data.decoupled = ml_collections.ConfigDict(
            dict(label_prompt_fraction=arg.prompt_fraction, text_only_fraction=arg.text_fraction)
        )
    return config
