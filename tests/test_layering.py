"""The core imports nothing from the data side: models, losses, the training package,
methods, evaluation and checkpointing load without `input_pipeline` and without
tensorflow (accelerator images have neither; the training loop and the entry points
import the input pipeline only when they read data)."""

import os
import subprocess
import sys

CORE = ("jaxmedclip.models", "jaxmedclip.losses", "jaxmedclip.training", "jaxmedclip.methods",
        "jaxmedclip.evaluation", "jaxmedclip.checkpointing", "jaxmedclip.optim",
        "jaxmedclip.parallel", "jaxmedclip.flops", "jaxmedclip.train")


def test_core_imports_neither_input_pipeline_nor_tensorflow():
    code = (
        "import importlib, sys\n"
        f"for name in {CORE!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('input_pipeline', 'tensorflow', 'tensorflow_datasets'))\n"
        "assert not bad, bad\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
