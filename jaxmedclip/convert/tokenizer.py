"""Our SentencePiece tokenizer as a Hugging Face `tokenizer.json` (the `tokenizers` library).

`AutoTokenizer.from_pretrained(folder)` then gives our ids: `normalize_text` (lowercase,
whitespace runs collapsed, stripped), the SentencePiece pieces, BOS + pieces + EOS, and,
with `padding="max_length", truncation=True`, rows cut to keep EOS and padded with 0.
"""

from __future__ import annotations

import json
import logging
import os

from jaxmedclip.vocabulary import BOS_ID, EOS_ID, PAD_ID, UNK_ID

SPM_UNIGRAM, SPM_BPE = 1, 2
SPM_NORMAL = 1
SPACE = "\u2581"  # SentencePiece's visible space.

log = logging.getLogger(__name__)


def _model_proto(model_path: str):
    with open(model_path, "rb") as f:
        return _parse(f.read())


def _parse(serialized: bytes):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(serialized)
    return proto


def vocabulary_signature(serialized: bytes) -> tuple:
    """What decides a SentencePiece model's ids: its type and its (piece, score, kind)
    table. Two trainings on the same texts give the same signature, though not the same
    bytes (the file records, e.g., the temporary path it was trained under)."""
    proto = _parse(serialized)
    pieces = tuple((p.piece, p.score, p.type) for p in proto.pieces)
    return proto.trainer_spec.model_type, pieces


def _bpe_merges(pieces: list[str], scores: list[float], normal: list[bool]) -> list[tuple]:
    """Merges in the order SentencePiece applies them: by the merged piece's score (higher
    first), every split of a piece into two known pieces."""
    ids = {p: i for i, p in enumerate(pieces)}
    merges = []
    for i, piece in enumerate(pieces):
        if not normal[i] or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                merges.append((-scores[i], i, ids[left], (left, right)))
    merges.sort()
    return [m[-1] for m in merges]


def check_exact(model_path: str, allow_inexact: bool = False) -> None:
    """Refuses (ValueError) a tokenizer that `tokenizer.json` cannot reproduce exactly.

    A unigram SentencePiece model is one: where two segmentations of a word score the same
    (e.g. "___" as "_" + "__" or "__" + "_": the same pieces, so no score can separate
    them), `tokenizers` and SentencePiece pick different ones, so rare texts would get
    other ids in PyTorch. With `allow_inexact` it is exported anyway, with a warning.
    """
    if _model_proto(model_path).trainer_spec.model_type != SPM_UNIGRAM:
        return
    problem = (
        f"{model_path} is a unigram SentencePiece model; `tokenizers` breaks ties between "
        "equally scored segmentations differently (e.g. '___' -> '_' '__' instead of "
        "'__' '_'), so some texts would get other ids than in training"
    )
    if not allow_inexact:
        raise ValueError(
            f"{problem}. Train the tokenizer as BPE (data.tokenizer_type='bpe'), which "
            "exports exactly, or export it anyway with --allow_inexact_tokenizer"
        )
    log.warning("%s (exported anyway: allow_inexact)", problem)


def build_tokenizer(model_path: str):
    """A `tokenizers.Tokenizer` equal to `input_pipeline.tokenizer.Tokenizer` (no padding)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing

    proto = _model_proto(model_path)
    pieces = [p.piece for p in proto.pieces]
    scores = [p.score for p in proto.pieces]
    normal = [p.type == SPM_NORMAL for p in proto.pieces]
    model_type = proto.trainer_spec.model_type
    if model_type == SPM_UNIGRAM:
        model = models.Unigram(
            list(zip(pieces, scores, strict=True)), unk_id=UNK_ID, byte_fallback=False
        )
    elif model_type == SPM_BPE:
        vocab = {p: i for i, p in enumerate(pieces)}
        model = models.BPE(
            vocab,
            _bpe_merges(pieces, scores, normal),
            unk_token=pieces[UNK_ID],
            fuse_unk=True,
            byte_fallback=False,
        )
    else:
        raise ValueError(
            f"{model_path}: SentencePiece model type {model_type} has no tokenizer.json "
            "equivalent here; export supports tokenizers trained as 'unigram' or 'bpe'"
        )
    tokenizer = Tokenizer(model)
    # normalize_text: " ".join(text.lower().split()).
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip(), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=SPACE, prepend_scheme="always", split=True
    )
    tokenizer.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="always", split=True)
    bos, eos = pieces[BOS_ID], pieces[EOS_ID]
    tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} $B:1 {eos}:1",
        special_tokens=[(bos, BOS_ID), (eos, EOS_ID)],
    )
    return tokenizer


def save_tokenizer(model_path: str, max_len: int, folder: str, allow_inexact: bool = False) -> None:
    """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json
    (`check_exact` first: a unigram model needs `allow_inexact`)."""
    check_exact(model_path, allow_inexact)
    tokenizer = build_tokenizer(model_path)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    pieces = [p.piece for p in _model_proto(model_path).pieces]
    special = {
        "pad_token": pieces[PAD_ID],
        "unk_token": pieces[UNK_ID],
        "bos_token": pieces[BOS_ID],
        "eos_token": pieces[EOS_ID],
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_len,
        "padding_side": "right",
        "truncation_side": "right",
        "model_input_names": ["input_ids", "attention_mask"],
        "clean_up_tokenization_spaces": False,
        # SentencePiece never reads "<s>" in a text as a control token; neither do we.
        "split_special_tokens": True,
        **special,
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
