"""CheXpert label names: the order of every `labels` vector in this project."""

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

FINDING_INDEX: dict[str, int] = {name: i for i, name in enumerate(CHEXPERT_FINDINGS)}
