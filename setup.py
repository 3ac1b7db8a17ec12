"""jaxmedclip: CLIP-style image-report pre-training for medical imaging in JAX."""

from setuptools import find_packages, setup

# The ranges admit this repository's CPU machines (Python 3.11, jax 0.10.x) and the
# accelerator images (Python 3.12, jax/jaxlib 0.11.x with flax/optax/orbax preinstalled).
CORE = [
    "jax>=0.10.0,<0.12",
    "flax>=0.11.0,<0.14",
    "optax>=0.2.4,<0.3",
    "orbax-checkpoint>=0.11.0,<0.14",
    "ml_collections>=1.0.0,<2",
    "numpy>=1.26,<3",
    # Needed only by input_pipeline/ (the models, losses and train step import without it).
    "tensorflow-cpu>=2.18,<2.22",
    "tensorflow-datasets>=4.9.7,<5",
    # tensorflow-datasets 4.9.10 imports it without declaring it (tensorflow/datasets#11212).
    "importlib_resources>=5",
    "sentencepiece>=0.2.0,<0.3",
    "pillow>=10,<14",
    # DICOM reading in input_pipeline/images.py (pydicom 3 pixel API: apply_voi, ...).
    "pydicom>=3.0,<4",
    # Evaluation metrics (AUC, bootstrap CIs, linear probes) and ROC plots.
    "scikit-learn>=1.3,<2",
    "matplotlib>=3.7,<4",
]

EXTRAS = {
    # Decoders for compressed DICOM that Pillow lacks (JPEG-LS, JPEG lossless, faster
    # JPEG 2000); pydicom finds them when installed.
    "dicom-codecs": [
        "pylibjpeg>=2.0,<3",
        "pylibjpeg-libjpeg>=2.1,<3",
        "pylibjpeg-openjpeg>=2.0,<3",
    ],
    "test": [
        "pytest>=8,<10",
        "pytest-xdist>=3.5,<4",  # The suite runs in parallel processes (pyproject.toml).
        "ruff>=0.6,<1",
    ],
    # PyTorch export/import (docs/pytorch.md). The ranges are what the parity tests
    # (tests/test_export.py, tests/test_export_cli.py, tests/test_convert.py) passed with:
    # torch 2.14.1 (CUDA build, with triton 3.8.0) and 2.13.0 (CPU build; a machine's
    # preinstalled CPU build is kept), transformers 5.25.0 and 5.24.0, tokenizers 0.23.3,
    # safetensors 0.8.0.
    "torch": [
        "torch>=2.13,<2.15",
        "transformers>=5.24,<5.26",
        "tokenizers>=0.23,<0.24",
        "safetensors>=0.8,<0.9",
    ],
}

setup(
    name="jaxmedclip",
    version="0.1.0",
    description="CLIP-style image-report pre-training for medical imaging in JAX",
    python_requires=">=3.11",
    packages=find_packages(
        include=["jaxmedclip", "jaxmedclip.*", "input_pipeline", "input_pipeline.*"]
    ),
    install_requires=CORE,
    extras_require=EXTRAS,
)
