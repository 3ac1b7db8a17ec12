"""The export's self-check: an exported folder, loaded as a PyTorch user loads it
(`AutoModel`, `AutoTokenizer`, `AutoImageProcessor`), computes what our JAX model computes.

`check_folder` runs both on a few square 8-bit images and a few report texts and returns
the largest differences of the image embeddings, text embeddings and logits, and whether
the token ids are identical; `ParityReport.problems` says what exceeds the tolerance.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

# Texts of the check: plain report sentences, odd case and whitespace, and one longer than
# any text length (truncated, EOS kept).
SAMPLE_TEXTS = (
    "No acute cardiopulmonary process.",
    "Moderate right pleural effusion. Heart size is normal.",
    "  LARGE left   pneumothorax.\n",
    "Endotracheal tube terminates 4 cm above the carina. The lungs are clear. " * 12,
)
# Embeddings are unit vectors; logits may differ by this times the scale.
DEFAULT_ATOL = 1e-4


@dataclasses.dataclass(frozen=True)
class ParityReport:
    """Largest absolute differences (transformers vs JAX, float32) on the check's inputs."""

    hf_class: str
    num_images: int
    num_texts: int
    image_embeds: float
    text_embeds: float
    logits: float
    scale: float
    token_ids_equal: bool
    atol: float

    def problems(self) -> list[str]:
        found = []
        if not self.token_ids_equal:
            found.append("AutoTokenizer's token ids differ from our SentencePiece tokenizer's")
        for name in ("image_embeds", "text_embeds"):
            if not getattr(self, name) <= self.atol:  # NaN fails too.
                found.append(f"max |{name} difference| {getattr(self, name):.3g} > {self.atol:g}")
        logits_atol = self.atol * max(1.0, self.scale)
        if not self.logits <= logits_atol:
            found.append(
                f"max |logits difference| {self.logits:.3g} > {logits_atol:.3g} "
                f"({self.atol:g} x the scale {self.scale:.4g})"
            )
        return found

    def summary(self) -> str:
        ids = "identical" if self.token_ids_equal else "DIFFERENT"
        return (
            f"{self.hf_class} vs JAX (float32) on {self.num_images} images and "
            f"{self.num_texts} texts: max |difference| image embeddings "
            f"{self.image_embeds:.2g}, text embeddings {self.text_embeds:.2g}, logits "
            f"{self.logits:.2g} (scale {self.scale:.4g}); token ids {ids}"
        )


def sample_images(config: ml_collections.ConfigDict, num: int = 3, seed: int = 0) -> np.ndarray:
    """uint8 [num, S, S, C] square images at the model's size: noise, and one smooth
    gradient with a bright disc (values a radiograph spans: dark to saturated)."""
    size = config.data.image_size
    channels = config.model.image.num_channels
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (num, size, size, channels), dtype=np.uint8)
    y, x = np.mgrid[:size, :size] / max(size - 1, 1)
    smooth = 200 * x + 40 * y + 255 * (((x - 0.4) ** 2 + (y - 0.6) ** 2) < 0.05)
    images[0] = np.clip(smooth, 0, 255).astype(np.uint8)[..., None]
    return images


def _pil(image: np.ndarray):
    from PIL import Image

    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def jax_outputs(
    config: ml_collections.ConfigDict,
    params: Mapping[str, Any],
    images: np.ndarray,
    tokens: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(image embeddings, text embeddings, logits, scale) of our model in float32.

    The model is rebuilt with float32 compute and XLA attention whatever the config
    trains with (the export writes float32 weights), and matmuls at full precision.
    """
    import jax
    import jax.numpy as jnp

    from jaxmedclip import models

    model_config = ml_collections.ConfigDict(config.model.to_dict())
    model_config.dtype, model_config.param_dtype = "float32", "float32"
    model_config.attention_impl = None
    model = models.build_model(model_config, config.data)
    host = jax.tree.map(lambda x: np.asarray(x, np.float32), dict(params))
    variables = {"params": host}
    x = (images.astype(np.float32) / 255.0 - config.data.image_mean) / config.data.image_std
    with jax.default_matmul_precision("highest"):
        image_emb = model.apply(variables, jnp.asarray(x), method=model.encode_image)
        text_emb = model.apply(variables, jnp.asarray(tokens), method=model.encode_text)
        scale, bias = model.apply(variables, method=model.temperature)
        logits = scale * image_emb @ text_emb.T
        if config.loss.name == "sigmoid":  # Other exports write a logit bias of 0.
            logits = logits + bias
    return np.asarray(image_emb), np.asarray(text_emb), np.asarray(logits), float(scale)


def check_folder(
    folder: str,
    hf_class: str,
    config: ml_collections.ConfigDict,
    params: Mapping[str, Any],
    our_tokens: np.ndarray,
    texts: Sequence[str] = SAMPLE_TEXTS,
    images: np.ndarray | None = None,
    atol: float = DEFAULT_ATOL,
) -> ParityReport:
    """Loads `folder` with the Auto classes and compares it with our model (see module).

    `our_tokens` are our tokenizer's rows of `texts`. Raises RuntimeError when the folder
    does not load as `hf_class` with exactly the written tensors; differences beyond
    `atol` are returned (`ParityReport.problems`), not raised.
    """
    import torch
    import transformers

    model, info = transformers.AutoModel.from_pretrained(folder, output_loading_info=True)
    wrong = {k: v for k, v in info.items() if k != "error_msgs" and v}
    if info.get("error_msgs"):
        wrong["error_msgs"] = info["error_msgs"]
    if type(model).__name__ != hf_class or wrong:
        raise RuntimeError(
            f"transformers {transformers.__version__} loads the exported folder as "
            f"{type(model).__name__} (expected {hf_class})"
            + (f" and not with exactly the exported tensors: {wrong}" if wrong else "")
        )
    model.eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    images = sample_images(config) if images is None else images
    text = tokenizer(list(texts), padding="max_length", truncation=True, return_tensors="pt")
    pixels = processor([_pil(im) for im in images], return_tensors="pt")
    with torch.no_grad():
        out = model(**text, pixel_values=pixels["pixel_values"])
    image_emb, text_emb, logits, scale = jax_outputs(config, params, images, our_tokens)
    hf_ids = text["input_ids"].numpy()

    def max_diff(theirs: Any, ours: np.ndarray) -> float:
        return float(np.max(np.abs(theirs.detach().numpy().astype(np.float64) - ours)))

    return ParityReport(
        hf_class=hf_class,
        num_images=len(images),
        num_texts=len(texts),
        image_embeds=max_diff(out.image_embeds, image_emb),
        text_embeds=max_diff(out.text_embeds, text_emb),
        logits=max_diff(out.logits_per_image, logits),
        scale=scale,
        token_ids_equal=hf_ids.shape == our_tokens.shape and bool(np.all(hf_ids == our_tokens)),
        atol=atol,
    )
