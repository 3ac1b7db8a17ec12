"""CheXpert label names: the order of every `labels` vector in this project.

Defined in `jaxmedclip.vocabulary`, which the core imports too; re-exported here for the
data side.
"""

from jaxmedclip.vocabulary import (  # noqa: F401
    CHEXPERT_FINDINGS,
    FINDING_INDEX,
    NUM_FINDINGS,
    SYNTHETIC_FINDINGS,
)
