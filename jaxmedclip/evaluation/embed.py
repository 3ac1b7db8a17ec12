"""Embedding a split (or a list of prompts) with the model's towers, sharded over the mesh.

Each host batch becomes one global array sharded over the batch axes
(`parallel.host_to_global`); one jitted call applies the towers and returns the embeddings
and the numeric fields replicated, so that every process can read the whole global batch.
Rows whose `mask` is False (padding of the last batch) are dropped.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmedclip import parallel

# Numeric batch fields carried next to the embeddings when the batch has them.
CARRIED_FIELDS = ("labels", "labels_present", "study_id", "text_id")
# Host-side fields (bytes); kept only when this is the only process, since each process
# reads only its part of the batch.
HOST_FIELDS = ("text", "view")


@dataclasses.dataclass
class SplitEmbeddings:
    """The embeddings of a split's valid rows and what came with them (numpy)."""

    image_emb: np.ndarray  # float32 [N, D]
    text_emb: np.ndarray | None  # float32 [N, D], None when texts were not embedded.
    fields: dict[str, np.ndarray]  # CARRIED_FIELDS present in the batches, [N, ...].
    texts: list[bytes] | None  # Normalised report texts (single process only).
    views: list[bytes] | None

    @property
    def num_examples(self) -> int:
        return int(self.image_emb.shape[0])

    @property
    def labels(self) -> np.ndarray:
        if "labels" not in self.fields:
            raise KeyError("the batches had no `labels`; this split cannot be scored")
        return self.fields["labels"]

    def text_keys(self) -> np.ndarray:
        """What identifies equal reports: the normalised texts, else their `text_id`s."""
        if self.texts is not None:
            return np.asarray(self.texts, dtype=object)
        if "text_id" in self.fields:
            return self.fields["text_id"]
        raise KeyError("the batches had neither `text` nor `text_id`; retrieval needs one")


class Embedder:
    """Jitted image/text embedding of host batches for one model, mesh and rule table."""

    def __init__(self, model: nn.Module, mesh: Mesh, rules):
        self.model, self.mesh, self.rules = model, mesh, rules
        replicated = NamedSharding(mesh, P())

        def embed_batch(params, batch, with_text: bool):
            variables = {"params": params}
            out = {"image_emb": model.apply(variables, batch["image"], method="encode_image")}
            if with_text:
                out["text_emb"] = model.apply(variables, batch["tokens"], method="encode_text")
            out.update({k: v for k, v in batch.items() if k != "image" and k != "tokens"})
            return out

        def embed_tokens(params, tokens):
            return model.apply({"params": params}, tokens, method="encode_text")

        def scale(params):
            return model.apply({"params": params}, method="temperature")[0]

        self._embed_batch = jax.jit(
            embed_batch, static_argnames="with_text", out_shardings=replicated
        )
        self._embed_tokens = jax.jit(embed_tokens, out_shardings=replicated)
        self._scale = jax.jit(scale, out_shardings=replicated)

    def _run(self, fn, *args, **kwargs):
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return fn(*args, **kwargs)

    def scale(self, params) -> float:
        """The model's logit scale (inverse temperature, as the softmax loss uses it)."""
        return float(jax.device_get(self._run(self._scale, params)))

    def embed_batches(
        self, params, batches: Iterable[Mapping[str, np.ndarray]], *, with_text: bool = True
    ) -> SplitEmbeddings:
        """Embeds every batch; keeps the rows with `mask` True."""
        single_process = jax.process_count() == 1
        outputs = []
        host: dict[str, list] = {key: [] for key in HOST_FIELDS}
        for batch in batches:
            numeric = {
                k: batch[k]
                for k in ("image", "tokens", "mask", *CARRIED_FIELDS)
                if k in batch and (k != "tokens" or with_text)
            }
            # Fetched after the loop, so that reading the next batch overlaps this one's compute.
            outputs.append(
                self._run(
                    self._embed_batch,
                    params,
                    parallel.host_to_global(numeric, self.mesh),
                    with_text=with_text,
                )
            )
            if single_process:
                local_keep = np.asarray(batch["mask"], bool)
                for key in HOST_FIELDS:
                    if key in batch:
                        host[key].extend(np.asarray(batch[key], dtype=object)[local_keep])
        if not outputs:
            raise ValueError("the dataset yielded no batches to embed")
        collected: dict[str, list[np.ndarray]] = {}
        for out in jax.device_get(outputs):
            keep = np.asarray(out.pop("mask"), bool)
            for key, value in out.items():
                collected.setdefault(key, []).append(np.asarray(value)[keep])
        arrays = {key: np.concatenate(values) for key, values in collected.items()}
        image_emb = arrays.pop("image_emb").astype(np.float32)
        text_emb = arrays.pop("text_emb").astype(np.float32) if with_text else None

        def host_field(key):
            values = host[key]
            return [bytes(v) for v in values] if single_process and values else None

        return SplitEmbeddings(image_emb, text_emb, arrays, host_field("text"), host_field("view"))

    def embed_tokens(self, params, tokens: np.ndarray) -> np.ndarray:
        """float32 [P, D] text embeddings of token rows [P, L] that every process holds."""
        tokens = np.asarray(tokens, np.int32)
        num = tokens.shape[0]
        # Padded to a multiple of the batch shards so that the batch dimension splits evenly.
        shards = parallel.batch_shards(self.mesh)
        padded = np.concatenate(
            [tokens, np.repeat(tokens[:1], math.ceil(num / shards) * shards - num, axis=0)]
        )
        global_tokens = jax.make_array_from_callback(
            padded.shape, parallel.batch_sharding(self.mesh), lambda index: padded[index]
        )
        out = jax.device_get(self._run(self._embed_tokens, params, global_tokens))
        return np.asarray(out[:num], np.float32)
