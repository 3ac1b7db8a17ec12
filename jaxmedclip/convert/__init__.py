"""Flax <-> PyTorch (Hugging Face `transformers`) conversion: name tables with tensor hooks.

`load_pretrained` imports Hugging Face weights into our towers; `jaxmedclip.export` writes
a trained model as a `transformers` folder. See docs/pytorch.md.
"""

from jaxmedclip.convert.pretrained import load_pretrained, read_safetensors, tower_sources
from jaxmedclip.convert.rules import ConversionError

__all__ = ["ConversionError", "load_pretrained", "read_safetensors", "tower_sources"]
