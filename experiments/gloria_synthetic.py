"""tiny_synthetic plus the GLoRIA-style local alignment of words and image regions.

loss = global contrastive loss + loss.local.weight * local loss, where the local loss
lets every word of a report attend over the patch tokens of every image of the global
batch (`jaxmedclip.methods.local_alignment`, docs/methods.md). `model.local_dim` adds the
two local projections (patch tokens and token features into one space); the train step
also needs the tokenizer's word-start table (`word_starts` of `training.make_train_step`).

Everything else is tiny_synthetic's (loaded from the file beside this one, so the two
stay in sync):

python -m jaxmedclip.train --config experiments/gloria_synthetic.py --workdir /tmp/gloria
python -m jaxmedclip.train --config experiments/gloria_synthetic.py:runlocal --workdir ...
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
        targets="multi_positive",
        local_weight=1.0,
        local_impl="",  # "": the same as loss_impl.
    )
    config = config_lib.load_config(
        f"{BASE}:recipe=clip,runlocal={arg.runlocal},loss_impl={arg.loss_impl},"
        f"total_steps={arg.total_steps},targets={arg.targets}"
    )
    config.model.local_dim = 64
    # GLoRIA's temperatures (attention t1, word aggregation t2, logits t3). 8 x 8 patches of
    # the 64-pixel image are the regions; the 48-token reports have at most 46 words.
    config.loss.local = ml_collections.ConfigDict(
        dict(
            weight=arg.local_weight,
            t1=4.0,
            t2=5.0,
            t3=10.0,
            impl=arg.local_impl or None,
            max_words=config.data.max_text_len - 2,
        )
    )
    return config
