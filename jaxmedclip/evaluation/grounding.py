"""Phrase grounding: where in an image a phrase's similarity map peaks, scored against
annotated regions.

Maps (`Grounder`), one value per patch token, upsampled (bilinear) to the model's input
size S x S:
- `patch_similarity` (plain CLIP towers): every patch token of the image tower's last
  layer goes the pooled vector's way (the image projection, L2 normalisation) and is
  compared with the phrase's text embedding: a cosine per patch.
- `word_attention` (models trained with the GLoRIA local loss, `loss.local`): the
  attention of each word of the phrase over the patches,
  softmax_p(t1 * cos(word, patch)) in the local projections, averaged over the words
  (`methods.local_alignment`'s step 1).
- `sentence_attention` (the local loss with `model.local_text="sentence"`): the same
  attention of the phrase's one pooled feature over the region features. With
  `model.local_source="patches"` those come from a head whose receptive field is a window
  or a few (`vit.LocalPatchHead`), not from the transformer's tokens: the map then says
  where the phrase's finding is, not what the whole image holds. A head with several
  branches (`model.local_head_kernels`) has a region per branch and window; a window's
  value is the sum of its branches' attention.
A head's window describes the pixels around its centre, not a point: its maps are spread
over them (`map_spread`: a Gaussian of sigma = the head's stride in pixels, after the
upsampling; `eval.grounding_spread` overrides it). Without it a window on a finding's edge
wins or loses the pointing game on which side of the edge its centre falls.
A finding's map is the mean of the maps of its positive zero-shot prompts
(`eval.prompts`), as its zero-shot score uses their mean embedding.

Metrics over the images with a region (bool [S, S]) for a phrase:
- pointing game: the map's maximum (first one if tied) falls inside the region;
- CNR, MS-CXR's contrast-to-noise ratio: |mean inside - mean outside| /
  sqrt(var inside + var outside) of the map's values; a constant map scores 0;
- baselines: `uniform`, a point drawn uniformly at random hits with probability the
  region's area fraction (a constant map's CNR is 0); `random`, the CNR of maps of
  independent standard normal values per patch, upsampled and spread as the model's maps
  are (seeded; |mean difference| makes noise score above 0); `prior`, the mean region
  mask of the finding over the scored images themselves used as every image's map (a map
  that knows only where the finding usually lies; fit on the scored split, so an
  optimistic bar).

`grounding_report` runs this on a synthetic split: each image positive (label 1) for one
of `eval.grounding_findings` whose `regions` record (synthetic_cxr >= 1.5.0) marks it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmedclip import parallel
from jaxmedclip.evaluation import prompts as prompts_lib
from jaxmedclip.methods import local_alignment
from jaxmedclip.models import l2_normalize
from jaxmedclip.vocabulary import FINDING_INDEX, LOCALISED_FINDINGS

log = logging.getLogger(__name__)

MAP_KINDS = ("patch_similarity", "word_attention", "sentence_attention")


def map_kind(config) -> str:
    """`word_attention` (or `sentence_attention`, `model.local_text="sentence"`) for a
    model trained with the local loss, else `patch_similarity`."""
    local = config.get("loss", {}).get("local")
    if local and local.get("weight", 1.0) > 0 and config.model.get("local_dim"):
        if config.model.get("local_text", "words") == "sentence":
            return "sentence_attention"
        return "word_attention"
    return "patch_similarity"


def word_starts(config, pieces: Sequence[str]) -> np.ndarray:
    """bool [data.vocab_size]: does token id i start a word (for `word_attention`)."""
    table = local_alignment.word_start_table(pieces)
    return np.pad(table, (0, max(0, config.data.vocab_size - len(table))))


def _maps_over_head(config) -> bool:
    """Are `config`'s maps read off a local head (`model.local_source="patches"`)?"""
    return (map_kind(config) != "patch_similarity"
            and config.model.get("local_source") == "patches")


def map_stride(config) -> int:
    """Pixels between the centres of neighbouring map cells: the local head's stride where
    its features make the maps, else the image tower's patch size."""
    patch = config.model.image.patch_size
    return (config.model.get("local_head_stride") or patch) if _maps_over_head(config) \
        else patch


def map_spread(config) -> float:
    """Sigma in pixels of the Gaussian that spreads `config`'s maps (module doc):
    `eval.grounding_spread` when set, else the local head's stride for maps over a head
    (`model.local_source="patches"`), else 0 (none)."""
    spread = config.get("eval", {}).get("grounding_spread")
    if spread is not None:
        if spread < 0:
            raise ValueError(f"eval.grounding_spread={spread} must be >= 0 (0: none)")
        return float(spread)
    return float(map_stride(config)) if _maps_over_head(config) else 0.0


def spread(maps: jax.Array, sigma: float) -> jax.Array:
    """maps [N, H, W] blurred by a Gaussian of `sigma` pixels (edges repeated); 0: as is."""
    if not sigma:
        return maps
    radius = max(1, math.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = jnp.asarray(taps / taps.sum(), maps.dtype)
    padded = jnp.pad(maps, ((0, 0), (radius, radius), (radius, radius)), mode="edge")
    size = 2 * radius + 1
    rows = sum(taps[k] * padded[:, k:k + maps.shape[1], :] for k in range(size))
    return sum(taps[k] * rows[:, :, k:k + maps.shape[2]] for k in range(size))


# ------------------------------------------------------------------------------------ maps


def _unit(x):
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


class Grounder:
    """Jitted phrase maps of one model on one mesh.

    `maps(params, images, phrase_tokens, phrase_index, phrase_weights)`: image n's map is
    sum_k phrase_weights[n, k] * map(image n, phrase phrase_index[n, k]), upsampled and
    spread by a Gaussian of `sigma` pixels (`spread`).
    """

    def __init__(self, model: nn.Module, mesh, rules, *, kind: str = "patch_similarity",
                 starts_word: np.ndarray | None = None, t1: float = 4.0,
                 sigma: float = 0.0):
        if kind not in MAP_KINDS:
            raise ValueError(f"map kind {kind!r} is unknown; choose one of {MAP_KINDS}")
        sentence = kind == "sentence_attention"
        if kind != "patch_similarity":
            local_text = "sentence" if sentence else "words"
            if getattr(model, "local_text", "words") != local_text:
                raise ValueError(f"{kind} maps need a model whose local_text is {local_text}")
            if model.local_dim is None or (starts_word is None and not sentence):
                raise ValueError(f"{kind} maps need the model's local projections "
                                 "(model.local_dim)" + ("" if sentence else
                                                        " and the tokenizer's word-start table"))
        self.model, self.mesh, self.rules, self.kind = model, mesh, rules, kind
        replicated = NamedSharding(mesh, P())
        head = getattr(model, "local_head", None)
        branches = len(head.kernels) if kind != "patch_similarity" and head is not None else 1

        def text_side(params, tokens):
            if kind == "patch_similarity":
                return model.apply({"params": params}, tokens, method="encode_text"), None

            def words(module, tokens):
                return local_alignment.text_words(module.local_texts(tokens), tokens,
                                                  starts_word, sentence=sentence)

            return model.apply({"params": params}, tokens, method=words)

        def image_side(params, images, text, word_mask, index, weights):
            def patch_maps(module, images):
                if kind == "patch_similarity":
                    _, patches = module.image_tower(images)  # [B, P, W]
                    emb = patches if module.image_proj is None else module.image_proj(patches)
                    return jnp.einsum("bpd,bkd->bkp", l2_normalize(emb),
                                      text[index].astype(jnp.float32))
                regions = _unit(module.local_regions(images).astype(jnp.float32))
                words = _unit(text[index].astype(jnp.float32))  # [B, K, W, D]
                attention = jax.nn.softmax(
                    t1 * jnp.einsum("bpd,bkwd->bkwp", regions, words), axis=-1)
                mask = word_mask[index][..., None].astype(jnp.float32)
                return (jnp.sum(attention * mask, axis=2)
                        / jnp.maximum(jnp.sum(mask, axis=2), 1.0))

            per_phrase = model.apply({"params": params}, images, method=patch_maps)
            # A multi-scale head's regions: branch-major, one grid per branch; a place's
            # value is the sum over the branches (of the attention that falls there).
            low = jnp.einsum("bkp,bk->bp", per_phrase, weights)
            low = low.reshape(low.shape[0], branches, -1).sum(axis=1)
            grid = math.isqrt(low.shape[1])
            low = low.reshape(low.shape[0], grid, grid)
            size = images.shape[1]
            return spread(jax.image.resize(low, (low.shape[0], size, size), "bilinear"), sigma)

        self._text_side = jax.jit(text_side, out_shardings=replicated)
        self._image_side = jax.jit(image_side, out_shardings=replicated)

    def _run(self, fn, *args):
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return fn(*args)

    def maps(self, params, images: np.ndarray, phrase_tokens: np.ndarray,
             phrase_index: np.ndarray, phrase_weights: np.ndarray, *,
             batch_size: int) -> np.ndarray:
        """float32 [N, S, S]: the maps of images [N, S, S, C] (preprocessed as evaluation
        does), phrase_tokens [Q, L], phrase_index int [N, K], phrase_weights [N, K]."""
        parallel.check_batch_size(batch_size, self.mesh)
        replicated = NamedSharding(self.mesh, P())
        tokens = jax.device_put(np.asarray(phrase_tokens, np.int32), replicated)
        text, word_mask = self._run(self._text_side, params, tokens)
        if word_mask is None:
            word_mask = jax.device_put(np.ones(text.shape[:1], bool), replicated)
        sharding = parallel.batch_sharding(self.mesh)
        arrays = (np.asarray(images, np.float32), np.asarray(phrase_index, np.int32),
                  np.asarray(phrase_weights, np.float32))
        num = arrays[0].shape[0]
        outputs = []
        for start in range(0, num, batch_size):
            batch = []
            for array in arrays:
                part = array[start:start + batch_size]
                pad = batch_size - part.shape[0]  # The last batch: padding rows.
                part = np.concatenate([part, np.zeros((pad, *part.shape[1:]), part.dtype)])
                batch.append(jax.make_array_from_callback(
                    part.shape, sharding, lambda index, part=part: part[index]))
            outputs.append(self._run(self._image_side, params, batch[0], text, word_mask,
                                     batch[1], batch[2]))
        maps = [np.asarray(m) for m in jax.device_get(outputs)]
        return np.concatenate(maps)[:num] if maps else np.zeros((0,) + arrays[0].shape[1:3],
                                                                 np.float32)


def grounder_for(config, model, mesh, rules, tokenizer) -> Grounder:
    """The `Grounder` of `config`'s model: word attention where it was trained with the
    local loss (`map_kind`), patch similarity otherwise."""
    kind, sigma = map_kind(config), map_spread(config)
    if kind == "patch_similarity":
        return Grounder(model, mesh, rules, sigma=sigma)
    t1 = float(config.loss.local.get("t1", 4.0))
    if kind == "sentence_attention":  # No words to find.
        return Grounder(model, mesh, rules, kind=kind, t1=t1, sigma=sigma)
    pieces = getattr(tokenizer, "pieces", None)
    if pieces is None:
        raise ValueError("word-attention maps (a model trained with loss.local) need the "
                         "SentencePiece tokenizer's pieces: use the training run's tokenizer")
    return Grounder(model, mesh, rules, kind=kind, starts_word=word_starts(config, pieces),
                    t1=t1, sigma=sigma)


# --------------------------------------------------------------------------------- metrics


def pointing_hit(heatmap: np.ndarray, region: np.ndarray) -> bool:
    """Does the (first) maximum of `heatmap` [H, W] fall inside `region` bool [H, W]?"""
    return bool(np.asarray(region).reshape(-1)[int(np.argmax(heatmap))])


def contrast_to_noise(heatmap: np.ndarray, region: np.ndarray) -> float:
    """|mean inside - mean outside| / sqrt(var inside + var outside); 0 for a map that is
    constant on both sides; NaN when the region is empty or the whole image."""
    values, region = np.asarray(heatmap, np.float64), np.asarray(region, bool)
    inside, outside = values[region], values[~region]
    if not inside.size or not outside.size:
        return float("nan")
    spread = math.sqrt(inside.var() + outside.var())
    return 0.0 if spread == 0 else abs(inside.mean() - outside.mean()) / spread


def random_maps(num: int, grid: int, size: int, seed: int = 0, sigma: float = 0.0
                ) -> np.ndarray:
    """float32 [num, size, size]: standard normal values on a grid x grid lattice of
    patches, upsampled (bilinear) and spread (`sigma`) as `Grounder` makes its maps."""
    low = np.random.default_rng(seed).standard_normal((num, grid, grid), np.float32)
    return np.asarray(spread(jax.image.resize(low, (num, size, size), "bilinear"), sigma))


def region_metrics(maps: np.ndarray, regions: np.ndarray, *, grid: int | None = None,
                   seed: int = 0, sigma: float = 0.0) -> dict[str, Any]:
    """Pointing game, CNR and their baselines (module doc) over maps / regions [N, H, W];
    `grid` (patches per side) adds the random maps' CNR, spread by `sigma` as the maps."""
    maps, regions = np.asarray(maps), np.asarray(regions, bool)
    n = len(regions)
    if n == 0:
        return {"n": 0}
    prior = regions.mean(axis=0)
    out = {
        "n": n,
        "pointing_game": float(np.mean([pointing_hit(m, r) for m, r in zip(maps, regions,
                                                                           strict=True)])),
        "pointing_game_uniform": float(regions.mean()),
        "pointing_game_prior": float(np.mean([pointing_hit(prior, r) for r in regions])),
        "cnr": float(np.nanmean([contrast_to_noise(m, r) for m, r in zip(maps, regions,
                                                                          strict=True)])),
        "cnr_prior": float(np.nanmean([contrast_to_noise(prior, r) for r in regions])),
    }
    if grid is not None:
        noise = random_maps(n, grid, regions.shape[-1], seed, sigma)
        out["cnr_random"] = float(np.nanmean([contrast_to_noise(m, r) for m, r in zip(
            noise, regions, strict=True)]))
    return out


MEAN_KEYS = ("pointing_game", "pointing_game_uniform", "pointing_game_prior", "cnr",
             "cnr_random", "cnr_prior")


def metrics_by_group(maps: np.ndarray, regions: np.ndarray, groups: Sequence[str], *,
                     grid: int | None = None, sigma: float = 0.0) -> dict[str, Any]:
    """{"per_finding": group -> `region_metrics`, "mean": the unweighted mean over the
    groups with images} for maps / regions [N, H, W] of `groups` [N] (finding or label)."""
    groups = np.asarray(groups, dtype=object)
    per = {str(g): region_metrics(maps[groups == g], regions[groups == g], grid=grid, seed=k,
                                  sigma=sigma)
           for k, g in enumerate(dict.fromkeys(groups.tolist()))}
    scored = [r for r in per.values() if r["n"]]
    mean = {key: float(np.mean([r[key] for r in scored])) if scored else None
            for key in MEAN_KEYS if all(key in r for r in scored)}
    return {"per_finding": per, "mean": mean}


# ----------------------------------------------------------------------- synthetic regions


class RegionCases(NamedTuple):
    """Images with an annotated region for a finding: one row per (image, finding)."""

    images: np.ndarray  # float32 [M, S, S, C], preprocessed as evaluation does.
    image_index: np.ndarray  # int [N]: the row of `images`.
    findings: list[str]  # [N]
    regions: np.ndarray  # bool [N, S, S]
    views: list[str]  # [N]


def has_regions(builder) -> bool:
    """Do the builder's records hold `regions` (synthetic_cxr >= 1.5.0)?"""
    return "regions" in builder.info.features


def model_space_masks(masks, size: int):
    """float [h, w, K] masks of a source image -> bool [S, S, K] masks in the model's
    input space: resized with the image's resize-with-pad, kept where >= 0.5."""
    from input_pipeline.stages.pixels import resize_with_pad

    return resize_with_pad(masks, size) >= 0.5


def synthetic_cases(builder, split: str, data_config, findings: Sequence[str],
                    max_examples: int = 0) -> RegionCases:
    """The (image, finding) pairs of `split` with the image positive for a finding of
    `findings` and its region not empty at the model's input size."""
    import tensorflow as tf

    from input_pipeline.stages.pixels import image_preprocess
    from input_pipeline.stages.source import RecordReader

    unknown = [f for f in findings if f not in LOCALISED_FINDINGS]
    if unknown:
        raise ValueError(f"eval.grounding_findings {unknown} have no recorded regions; "
                         f"choose from {LOCALISED_FINDINGS}")
    bits = [LOCALISED_FINDINGS.index(f) for f in findings]
    columns = [FINDING_INDEX[f] for f in findings]
    reader = RecordReader(builder, split)
    count = len(reader) if not max_examples else min(max_examples, len(reader))
    specs = {"image": tf.io.FixedLenFeature([], tf.string),
             "regions": tf.io.FixedLenFeature([], tf.string),
             "view": tf.io.FixedLenFeature([], tf.string),
             "labels": tf.io.FixedLenFeature([len(FINDING_INDEX)], tf.float32)}
    size = data_config.image_size

    def load(serialized):
        example = tf.io.parse_single_example(serialized, specs)
        positive = tf.equal(tf.gather(example["labels"], columns), 1.0)
        region_map = tf.cast(tf.io.decode_png(example["regions"], channels=1), tf.int32)
        masks = tf.cast(tf.bitwise.bitwise_and(
            tf.bitwise.right_shift(region_map, tf.constant(bits, tf.int32)), 1), tf.float32)
        return {"image": image_preprocess(example["image"], data_config),
                "regions": model_space_masks(masks, size), "positive": positive,
                "view": example["view"]}

    serialized = reader.read(np.arange(count))
    dataset = (tf.data.Dataset.from_tensor_slices(list(serialized))
               .map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
               .batch(256))
    images, image_index, names, regions, views = [], [], [], [], []
    for batch in dataset.as_numpy_iterator():
        for row in range(len(batch["positive"])):
            found = [k for k in range(len(findings))
                     if batch["positive"][row, k] and batch["regions"][row, :, :, k].any()]
            if not found:
                continue
            for k in found:
                image_index.append(len(images))
                names.append(findings[k])
                regions.append(batch["regions"][row, :, :, k])
                views.append(batch["view"][row].decode())
            images.append(batch["image"][row])
    return RegionCases(np.stack(images) if images else np.zeros((0, size, size, 1),
                                                                np.float32),
                       np.asarray(image_index, np.int64), names,
                       np.stack(regions) if regions else np.zeros((0, size, size), bool),
                       views)


def finding_prompts(cfg, findings: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Each finding's grounding phrases: its positive zero-shot prompts (`eval.prompts`)."""
    return {f: prompts_lib.prompt_set(f, cfg.prompts).positive for f in findings}


def phrase_table(phrases_of: Mapping[str, Sequence[str]], keys: Sequence[str]
                 ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(distinct phrases [Q], phrase_index [N, K], phrase_weights [N, K]) for rows whose
    map is the mean of the maps of `phrases_of[keys[n]]`."""
    phrases = list(dict.fromkeys(p for key in keys for p in phrases_of[key]))
    position = {p: i for i, p in enumerate(phrases)}
    width = max((len(phrases_of[key]) for key in keys), default=1)
    index = np.zeros((len(keys), width), np.int32)
    weights = np.zeros((len(keys), width), np.float32)
    for row, key in enumerate(keys):
        ids = [position[p] for p in phrases_of[key]]
        index[row, :len(ids)] = ids
        weights[row, :len(ids)] = 1.0 / len(ids)
    return phrases, index, weights


def patch_grid(config) -> int:
    """Patches per side of the model's maps: the local head's where its features make
    them (`model.local_source="patches"`), else the image tower's (`map_stride`)."""
    return config.data.image_size // map_stride(config)


def grounding_report(cfg, config, model, params, mesh, builder, tokenizer, split: str
                     ) -> dict[str, Any] | None:
    """The grounding metrics of `split` (module doc); None when its records hold no
    regions. `cfg` is the `eval_config`."""
    if not has_regions(builder):
        log.info("grounding skipped: the records of %s hold no finding regions", builder.name)
        return None
    findings = tuple(cfg.grounding_findings)
    result = finding_maps(cfg, config, model, params, mesh, builder, tokenizer, split)
    cases = result.cases
    sigma = map_spread(config)
    out = metrics_by_group(result.maps, cases.regions, cases.findings, grid=patch_grid(config),
                           sigma=sigma)
    for finding in findings:  # Findings without a positive image with a region.
        out["per_finding"].setdefault(finding, {"n": 0})
    out["per_finding"] = {f: out["per_finding"][f] for f in findings}
    return {"map": result.kind, "spread": sigma,
            "num_images": int(len(cases.images)), **out,
            "prompts": {f: list(p) for f, p in result.prompts.items()}}


class FindingMaps(NamedTuple):
    """The scored cases of a split and their maps (`finding_maps`)."""

    cases: RegionCases
    maps: np.ndarray  # float32 [N, S, S]: case n's finding's map over its image.
    kind: str  # The map kind (MAP_KINDS).
    prompts: dict[str, tuple[str, ...]]  # Each finding's phrases.


def finding_maps(cfg, config, model, params, mesh, builder, tokenizer, split: str
                 ) -> FindingMaps:
    """Each (image, finding) case of `split` (`synthetic_cases` of
    `cfg.grounding_findings`) with its finding's map: the mean of the maps of its positive
    zero-shot prompts. `cfg` is the `eval_config`."""
    findings = tuple(cfg.grounding_findings)
    cases = synthetic_cases(builder, split, config.data, findings, cfg.max_examples)
    phrases_of = finding_prompts(cfg, findings)
    grounder = grounder_for(config, model, mesh, parallel.logical_rules(config), tokenizer)
    phrases, index, weights = phrase_table(phrases_of, cases.findings)
    maps = grounder.maps(params, cases.images[cases.image_index],
                         tokenizer.encode_batch(phrases), index, weights,
                         batch_size=cfg.batch_size)
    return FindingMaps(cases, maps, grounder.kind, phrases_of)


# ------------------------------------------------------------------------------- reporting


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.{digits}f}"


def summary_lines(grounding: Mapping[str, Any]) -> list[str]:
    """The console table of a report's `grounding` section."""
    spread = f", spread {grounding['spread']:g} px" if grounding.get("spread") else ""
    lines = [f"grounding ({grounding['map'].replace('_', ' ')} maps{spread}): pointing game "
             "(baselines: uniform point, location prior), CNR (random map, location prior)",
             f"  {'finding':<28} {'n':>5} {'pointing':>9} {'uniform':>8} {'prior':>6} "
             f"{'CNR':>6} {'random':>7} {'prior':>6}"]
    rows = [*grounding["per_finding"].items(), ("mean", {"n": None, **grounding["mean"]})]
    for name, r in rows:
        lines.append(
            f"  {name:<28} {'' if r.get('n') is None else r['n']:>5} "
            f"{_fmt(r.get('pointing_game')):>9} {_fmt(r.get('pointing_game_uniform')):>8} "
            f"{_fmt(r.get('pointing_game_prior')):>6} {_fmt(r.get('cnr')):>6} "
            f"{_fmt(r.get('cnr_random')):>7} {_fmt(r.get('cnr_prior')):>6}")
    return lines


def flat_metrics(grounding: Mapping[str, Any]) -> dict[str, float | None]:
    """Scalars of a report's `grounding` section (keys without the `eval/` prefix)."""
    out: dict[str, float | None] = {
        "grounding_mean_pointing_game": grounding["mean"]["pointing_game"],
        "grounding_mean_cnr": grounding["mean"]["cnr"],
    }
    for name, r in grounding["per_finding"].items():
        out[f"grounding_pointing_game/{prompts_lib.slug(name)}"] = r.get("pointing_game")
        out[f"grounding_cnr/{prompts_lib.slug(name)}"] = r.get("cnr")
    return out
