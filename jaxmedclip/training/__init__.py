"""The training package: one job per module.

- state.py: `TrainState`, sharded initialisation (nothing built on one device).
- objective.py: the towers' outputs -> loss and metrics (global loss, GLoRIA local term,
  CXR-CLIP multi-view terms), settings checked once.
- gradcache.py: GradCache over micro-batches.
- step.py: the jitted train step (objective, gradients, optax update).
- setup.py: config checks, mesh / model / optimizer / step (`build`), completed with the
  tokenizer (`with_tokenizer`), the abstract batch, the ahead-of-time compile report.
- resume.py: resuming, `init_from`, the workdir's tokenizer.
- metrics.py: metric lines, progress bar, finite-step check.
- preemption.py: SIGTERM / SIGINT handling.
- loop.py: `train` (data, resume, the loop, evaluation during training).

`python -m jaxmedclip.train` (jaxmedclip/train.py) is the command-line entry point.
"""

from jaxmedclip.training.gradcache import check_microbatch_size
from jaxmedclip.training.loop import DataError, TrainResult, prepare_data, train
from jaxmedclip.training.metrics import console_logging
from jaxmedclip.training.objective import LocalTerm, Objective, multiview_enabled
from jaxmedclip.training.resume import (
    WORKDIR_TOKENIZER,
    init_from_pretrained,
    record_tokenizer,
    resume,
)
from jaxmedclip.training.setup import (
    Setup,
    abstract_batch,
    build,
    check_config,
    check_tokenizer_fits,
    compile_report,
    initial_state,
    local_loss_enabled,
    with_tokenizer,
    word_starts_of,
)
from jaxmedclip.training.state import (
    TrainState,
    create_train_state,
    dummy_inputs,
    state_shardings,
)
from jaxmedclip.training.step import make_loss_and_grads, make_train_step

__all__ = [
    "WORKDIR_TOKENIZER",
    "DataError",
    "LocalTerm",
    "Objective",
    "Setup",
    "TrainResult",
    "TrainState",
    "abstract_batch",
    "build",
    "check_config",
    "check_tokenizer_fits",
    "check_microbatch_size",
    "compile_report",
    "console_logging",
    "create_train_state",
    "dummy_inputs",
    "init_from_pretrained",
    "initial_state",
    "local_loss_enabled",
    "make_loss_and_grads",
    "make_train_step",
    "multiview_enabled",
    "prepare_data",
    "record_tokenizer",
    "resume",
    "state_shardings",
    "train",
    "with_tokenizer",
    "word_starts_of",
]
