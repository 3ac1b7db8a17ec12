"""jaxmedclip: CLIP-style image-report pre-training for medical imaging in JAX.

The core (models, losses, train step) imports without tensorflow; only
`input_pipeline` needs it.
"""

__version__ = "0.1.0"
