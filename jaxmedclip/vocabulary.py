"""Names both packages share: finding names (the order of every `labels` vector) and the
tokenizer's special token ids.

`jaxmedclip` (models, losses, export) and `input_pipeline` (builders, labeler, tokenizer)
both import this module; it imports nothing, so neither package needs the other for it.
"""

# Special token ids of every SentencePiece model this project trains (see
# input_pipeline/tokenizer.py): token rows are BOS + pieces + EOS, right-padded with PAD.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

CHEXPERT_FINDINGS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

NUM_FINDINGS = len(CHEXPERT_FINDINGS)

# What the synthetic generator draws into its images (and asserts in its reports).
# Its reports may also negate "Enlarged Cardiomediastinum" and "Fracture"; they never
# mention the remaining CheXpert findings, whose labels are always blank (NaN).
SYNTHETIC_FINDINGS: tuple[str, ...] = (
    "No Finding",
    "Cardiomegaly",
    "Lung Opacity",
    "Edema",
    "Consolidation",
    "Pneumothorax",
    "Pleural Effusion",
    "Support Devices",
)

# The synthetic findings drawn in one place of the image, whose regions the generator
# records (bit k of a region map = LOCALISED_FINDINGS[k]) for grounding evaluation.
LOCALISED_FINDINGS: tuple[str, ...] = (
    "Pleural Effusion",
    "Pneumothorax",
    "Consolidation",
    "Lung Opacity",
)

FINDING_INDEX: dict[str, int] = {name: i for i, name in enumerate(CHEXPERT_FINDINGS)}
NO_FINDING_INDEX = FINDING_INDEX["No Finding"]
