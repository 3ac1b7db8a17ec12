"""GLoRIA-style local alignment of words and image regions, over the whole global batch.

For an image i with region (patch) features v_i1..v_iP and a text j with word features
w_j1..w_jL (valid words only, `word_mask`), all projected to the same dimension:

1. attention of each word over the regions of the image, sharpened by t1:
     a_jl,p = softmax_p(t1 * cos(w_jl, v_ip))
2. the region context of each word: c_ijl = sum_p a_jl,p v_ip
3. the word-context agreement r_ijl = cos(w_jl, c_ijl), aggregated over the valid words
   of text j by a log-sum-exp sharpened by t2:
     s_ij = (1 / t2) log sum_l exp(t2 * r_ijl)
   (a text without valid words gets s = 0 with every image);
4. logits t3 * s_ij and the symmetric cross-entropy with one-hot targets over the valid
   examples (`mask`): loss = i2t_weight * loss_i2t + t2i_weight * loss_t2i, each
   direction averaged over the N valid rows (columns).

Implementations (`impl`, as for the global loss in `jaxmedclip.losses`):
- `dense`: the [B, B] similarity matrix on one device; the reference.
- `all_gather`: under `shard_map` over the batch axes, each device gathers every text's
  word features and scores its local images against all of them ([b, B] block).
- `ring`: the word features travel around the devices of the batch axes (`ppermute`);
  each step scores the local images against one visiting block of texts ([b, b]). The
  pair computation of a step is rematerialised in the backward pass (`jax.checkpoint`),
  so its [b, b, L, P] intermediates are never held for more than one block.
In both sharded forms only the small [B, B] similarity matrix is gathered afterwards
(for the text->image direction). Gradients are plain autodiff through `shard_map`.

Memory: the pair computation is O(b * B * L * (P + D)) floats per device for
`all_gather` (attention [b, B, L, P] and contexts [b, B, L, D]) and O(b * b * L * (P + D))
per ring step; the ring's backward pass also keeps each visiting word block
(B * L * D in all). Fine for small configs (b = 32, B = 1024, L = 64 words, P = 196
patches is 32 * 1024 * 64 * 196 * 4 bytes = 1.6 GB for the attention alone with
all_gather); use `ring` or fewer words/regions beyond that.

`merge_subwords` turns SentencePiece token features into word features: pieces that
start with "▁" begin a word, the others are averaged into the word before them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxmedclip import config_schema
from jaxmedclip.losses.collectives import (
    all_gather,
    axes_size,
    batch_axes_of,
    check_divisible,
    global_ids,
    place,
    psum,
    ring_pass,
)
from jaxmedclip.losses.spec import IMPLEMENTATIONS, LossSpec
from jaxmedclip.losses.targets import softmax_row_losses
from jaxmedclip.parallel import BATCH_AXES
from jaxmedclip.vocabulary import BOS_ID, EOS_ID, PAD_ID

WORD_START = "\u2581"  # SentencePiece's word-boundary mark "▁".
# The tokenizer's special ids are not words.
SPECIAL_IDS = (PAD_ID, BOS_ID, EOS_ID)
_MASKED = -1e9
ONE_HOT = LossSpec(targets="one_hot")  # The local loss's targets: no smoothing.


# ------------------------------------------------------------------------ words from pieces


def word_start_table(pieces: Sequence[str]) -> np.ndarray:
    """bool [vocab]: does piece id i start a new word ("▁" prefix)?

    `pieces` is the SentencePiece piece of every id, e.g.
    `[sp.id_to_piece(i) for i in range(sp.get_piece_size())]`.
    """
    return np.array([piece.startswith(WORD_START) for piece in pieces], dtype=bool)


def merge_subwords(
    token_features: jax.Array,
    token_ids: jax.Array,
    starts_word: jax.Array | np.ndarray,
    *,
    special_ids: Sequence[int] = SPECIAL_IDS,
    max_words: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Token features [B, T, D] -> (word features [B, W, D], word mask bool [B, W]).

    A word is a token whose id starts a word (`starts_word[id]`, see `word_start_table`),
    or the first token after a special one, followed by the tokens that continue it; its
    feature is the mean of its tokens' features. Special tokens (`special_ids`: padding,
    BOS, EOS) belong to no word. Words are packed to the left; W = `max_words` (default
    T) and words beyond it are dropped. Static shapes, pure jnp.
    """
    if token_features.ndim != 3 or token_features.shape[:2] != token_ids.shape:
        raise ValueError(
            f"token_features must be [batch, tokens, dim] matching token_ids [batch, tokens]; "
            f"got {token_features.shape} and {token_ids.shape}"
        )
    num_words = token_ids.shape[1] if max_words is None else int(max_words)
    table = jnp.asarray(starts_word, dtype=bool)
    valid = ~jnp.isin(token_ids, jnp.asarray(special_ids, token_ids.dtype))
    after_valid = jnp.pad(valid[:, :-1], ((0, 0), (1, 0)))
    starts = valid & (table[token_ids] | ~after_valid)
    index = jnp.where(valid, jnp.cumsum(starts, axis=1) - 1, -1)
    assign = (index[:, :, None] == jnp.arange(num_words)[None, None, :]).astype(jnp.float32)
    counts = jnp.sum(assign, axis=1)  # [B, W]
    summed = jnp.einsum("btw,btd->bwd", assign, token_features.astype(jnp.float32))
    words = summed / jnp.maximum(counts, 1.0)[:, :, None]
    return words.astype(token_features.dtype), counts > 0


def text_words(
    text_local: jax.Array,
    token_ids: jax.Array,
    starts_word: jax.Array | np.ndarray | None,
    *,
    sentence: bool = False,
    max_words: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """A model's local text features -> (word features [B, W, D], word mask bool [B, W]):
    `merge_subwords` of token features [B, T, D], or, with `sentence` (the model's
    `local_text="sentence"`: features [B, 1, D] of the pooled text), the text's one word."""
    if sentence:
        return text_local, jnp.ones(text_local.shape[:2], bool)
    return merge_subwords(text_local, token_ids, starts_word, max_words=max_words)


# ------------------------------------------------------------------------------ similarity


def _unit(x: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


def local_similarity(
    image_tokens: jax.Array,
    word_features: jax.Array,
    word_mask: jax.Array,
    t1: jax.Array | float,
    t2: jax.Array | float,
) -> jax.Array:
    """s [b_images, c_texts] of every (image, text) pair (steps 1-3 of the module doc)."""
    regions = image_tokens.astype(jnp.float32)
    words = _unit(word_features.astype(jnp.float32))
    cosine = jnp.einsum("ipd,jld->ijlp", _unit(regions), words)
    attention = jax.nn.softmax(t1 * cosine, axis=-1)
    context = jnp.einsum("ijlp,ipd->ijld", attention, regions)
    agreement = jnp.sum(_unit(context) * words[None], axis=-1)  # [b, c, L]
    mask = word_mask[None, :, :]
    pooled = jax.nn.logsumexp(jnp.where(mask, t2 * agreement, _MASKED), axis=-1) / t2
    return jnp.where(jnp.any(mask, axis=-1), pooled, 0.0)


def _direction_sum(logits, row_ids, row_valid, col_valid):
    """Sum of -log p(own partner) over the valid rows of a [rows, B] logit block."""
    own = row_ids[:, None] == jnp.arange(logits.shape[1], dtype=row_ids.dtype)[None, :]
    return jnp.sum(softmax_row_losses(logits, own.astype(jnp.float32), row_valid, col_valid,
                                      1.0, ONE_HOT))


def _finish(i2t, t2i, count, i2t_weight, t2i_weight):
    count = jnp.maximum(count, 1.0)
    loss_i2t, loss_t2i = i2t / count, t2i / count
    loss = i2t_weight * loss_i2t + t2i_weight * loss_t2i
    return loss, {"loss_i2t": loss_i2t, "loss_t2i": loss_t2i}


# ----------------------------------------------------------------------------- sharded forms


def _sums_from_rows(rows_s, t3, mask, all_mask, axes):
    """i2t over the local rows, t2i over the local columns of the gathered [B, B] s."""
    ids = global_ids(rows_s.shape[0], axes)
    i2t = _direction_sum(t3 * rows_s, ids, mask, all_mask)
    full = all_gather(rows_s, axes)  # [B, B], small
    columns = jnp.take(full, ids, axis=1).T  # [local texts, B images]
    t2i = _direction_sum(t3 * columns, ids, mask, all_mask)
    count = jnp.sum(mask, dtype=jnp.float32)
    return psum(jnp.stack([i2t, t2i, count]), axes)


def _all_gather_body(regions, words, word_mask, mask, t1, t2, t3, *, axes):
    gather = lambda a: all_gather(a, axes)
    rows_s = local_similarity(regions, gather(words.astype(jnp.float32)), gather(word_mask),
                              t1, t2)
    return _sums_from_rows(rows_s, t3, mask, gather(mask), axes)


def _ring_body(regions, words, word_mask, mask, t1, t2, t3, *, axes, size):
    local = regions.shape[0]
    score = jax.checkpoint(local_similarity)

    def visit(block, travel, rows_s):
        block_words, block_mask, block_ids = block
        s = score(regions, block_words, block_mask, t1, t2)
        return travel, jax.lax.dynamic_update_slice(rows_s, s, (0, block_ids[0]))

    block = (words.astype(jnp.float32), word_mask, global_ids(local, axes))
    rows_s = jnp.zeros((local, local * size), jnp.float32)
    _, rows_s = ring_pass(visit, block, (), rows_s, axes=axes, size=size)
    return _sums_from_rows(rows_s, t3, mask, all_gather(mask, axes), axes)


def local_alignment_loss(
    image_tokens: jax.Array,
    word_features: jax.Array,
    word_mask: jax.Array,
    mask: jax.Array | None = None,
    *,
    t1: jax.Array | float = 4.0,
    t2: jax.Array | float = 5.0,
    t3: jax.Array | float = 10.0,
    impl: str = "all_gather",
    mesh: Mesh | None = None,
    batch_axes: Sequence[str] | str = BATCH_AXES,
    i2t_weight: float = 0.5,
    t2i_weight: float = 0.5,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GLoRIA local loss (module doc) -> (loss, {"loss_i2t", "loss_t2i"}).

    `image_tokens` [B, P, D] and `word_features` [B, L, D] are projected to the same D;
    `word_mask` bool [B, L] marks real words, `mask` bool [B] real examples (default
    all). Global arrays; with a mesh the batch dimension is sharded over `batch_axes`.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl={impl!r} is unknown; choose one of {IMPLEMENTATIONS}")
    batch = image_tokens.shape[0]
    if (image_tokens.ndim != 3 or word_features.ndim != 3
            or word_features.shape[0] != batch or image_tokens.shape[2] != word_features.shape[2]
            or word_mask.shape != word_features.shape[:2]):
        raise ValueError(
            "expected image_tokens [B, P, D], word_features [B, L, D], word_mask [B, L]; got "
            f"{image_tokens.shape}, {word_features.shape}, {word_mask.shape}"
        )
    mask = jnp.ones((batch,), bool) if mask is None else jnp.asarray(mask).astype(bool)
    if mask.shape != (batch,):
        raise ValueError(f"mask must be bool [{batch}]; got shape {mask.shape}")
    word_mask = jnp.asarray(word_mask).astype(bool)
    temps = [jnp.asarray(t, jnp.float32).reshape(()) for t in (t1, t2, t3)]

    if impl == "dense" or mesh is None:
        s = local_similarity(image_tokens, word_features, word_mask, temps[0], temps[1])
        ids = jnp.arange(batch)
        count = jnp.sum(mask, dtype=jnp.float32)
        i2t = _direction_sum(temps[2] * s, ids, mask, mask)
        t2i = _direction_sum(temps[2] * s.T, ids, mask, mask)
        return _finish(i2t, t2i, count, i2t_weight, t2i_weight)

    axes = batch_axes_of(mesh, batch_axes)
    size = axes_size(mesh, axes)
    check_divisible(batch, size, axes, "`mask`")
    rows, rep = P(axes), P()
    args = [place(a, mesh, rows) for a in (image_tokens, word_features, word_mask, mask)]
    temps = [place(t, mesh, rep) for t in temps]
    if impl == "all_gather":
        body = lambda *a: _all_gather_body(*a, axes=axes)
    else:
        body = lambda *a: _ring_body(*a, axes=axes, size=size)
    sums = jax.shard_map(
        body, mesh=mesh, in_specs=(rows, rows, rows, rows, rep, rep, rep), out_specs=rep,
        check_vma=False,
    )(*args, *temps)
    return _finish(sums[0], sums[1], sums[2], i2t_weight, t2i_weight)


def local_alignment_config(config: ml_collections.ConfigDict | Mapping[str, Any] | None,
                           default_impl: str = "all_gather") -> dict[str, Any]:
    """Keyword arguments of `local_alignment_loss` from `config.loss.local`.

    Fields and defaults: `config_schema.LOCAL`; `impl` None means `default_impl`, i.e.
    the global loss's `loss.impl`. `weight` (the
    term's weight in the total loss) and `max_words` (for `merge_subwords`) are the
    trainer's and are not returned.
    """
    values = config_schema.complete_section("loss.local", config)
    kwargs = {name: values[name] for name in ("t1", "t2", "t3", "i2t_weight", "t2i_weight")}
    kwargs["impl"] = values["impl"] or default_impl
    for name in ("t1", "t2", "t3"):
        if not kwargs[name] > 0:
            raise ValueError(f"loss.local.{name}={kwargs[name]} must be > 0")
    return kwargs
