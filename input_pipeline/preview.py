"""A grid of examples as the model sees them: images, texts and labels out of the pipeline.

    python -m input_pipeline.preview --config experiments/tiny_synthetic.py \\
        [--config.data.x=...] [--split train] [--n 16] [--step 0] [--eval] [--out grid.png]

Prepares `config.data` as training does (`pipeline.prepare`: the records are built and the
tokenizer trained where absent) and reads `--n` rows from `pipeline.make_dataset` on one
process. `--split train` shows the first `--n` rows of training from global batch
`--step` on, exactly as training gets them (same seed, `global_batch_size`, order,
sentence sampling, augmentation, label prompts and other views); any other split, or
`--eval`, shows records `[step*n, (step+1)*n)` as evaluation reads them (no augmentation,
whole texts, view names).

Each tile holds:
  header  its number, the view (evaluation only: training batches do not carry it) and
          the study's `study_id` hash from the batch (equal for the views of one study).
  images  the pipeline's normalised float image mapped back to display: x * image_std +
          image_mean gives the [0, 1] intensities the pipeline decoded (a 16-bit PNG's
          0..65535 and an 8-bit one's 0..255 both span [0, 1]), clipped to [0, 1]
          (photometric augmentation can leave it) and shown as 0..255 gray. The mapping
          is fixed, not stretched per image, so a dim source (say 12-bit values stored
          in a 16-bit PNG) looks as dim as the model finds it; the line under the labels
          gives the image's intensity range and the share clipped. With
          `data.multiview`, the example's second view is shown beside the first.
  labels  + positive, ? uncertain, - negative findings (blank ones left out).
  text    the tokens decoded back through the tokenizer: what the model reads, cut at
          `data.max_text_len`; a cut text ends with a red "[+N tokens cut ...]" (and the
          tile's notes say "text cut", in case the text does not fit the tile). Label
          prompts (`data.decoupled`; label-only data such as chexpert reads its labels
          as text this way) and text-only rows are marked.

Rows the pipeline skips (image not an intact PNG, or an empty text in training) are gray
tiles; `data.max_bad_fraction` is lifted, since a handful of rows says nothing about the
fraction. Label-only records (chexpert) have no text in training unless `data.decoupled`
is set (e.g. `--config.data.decoupled={}`: `label_only_prompts` then turns their labels
into text).

A command-line entry point like `input_pipeline.build`: `jaxmedclip.config_lib` is
imported in `main` only, and an error in the config or the data ends it with one line,
`error: ...` (`cli_errors`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Sequence

import ml_collections
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from input_pipeline.findings import CHEXPERT_FINDINGS
from jaxmedclip import batch_schema
from jaxmedclip.vocabulary import BOS_ID, EOS_ID, PAD_ID

# Tokens of the second, uncut read of the texts that tells how much the cut left out.
FULL_TEXT_LEN = 2048
PAD = 6  # Margin inside a tile, pixels.
GAP = 4  # Between a tile's images and its text.
TEXT_WIDTH = 340
FONT_SIZE = 12
LINE_HEIGHT = 15
MIN_TEXT_LINES = 12  # A tile is at least this many lines high, whatever the image size.
_BLACK, _GRAY, _RED = (0, 0, 0), (120, 120, 120), (200, 0, 0)
_LABEL_COLORS = {"+": (170, 20, 20), "?": (190, 110, 0), "-": (20, 120, 40)}
_NOTE_COLOR = (110, 40, 160)


@dataclasses.dataclass(frozen=True)
class LabelSummary:
    """The findings of one label row by value; blank findings are in none of them."""

    positive: tuple[str, ...]
    uncertain: tuple[str, ...]
    negative: tuple[str, ...]

    def lines(self) -> list[str]:
        """"+ a, b", "? c", "- d" for the non-empty groups; "no labels" for none."""
        groups = (("+", self.positive), ("?", self.uncertain), ("-", self.negative))
        lines = [f"{sign} {', '.join(names)}" for sign, names in groups if names]
        return lines or ["no labels"]


def label_summary(labels: np.ndarray, present: np.ndarray) -> LabelSummary:
    """A batch's label row (float [14], 1 / 0 / -1, blank read as 0) and `labels_present`
    (bool [14]) -> the positive, uncertain and negative findings, in CheXpert order."""
    labels, present = np.asarray(labels), np.asarray(present, bool)

    def named(value: float) -> tuple[str, ...]:
        return tuple(name for name, v, p in zip(CHEXPERT_FINDINGS, labels, present,
                                                strict=True) if p and v == value)

    return LabelSummary(named(1.0), named(-1.0), named(0.0))


def display_intensities(image: np.ndarray, image_mean: float, image_std: float
                        ) -> np.ndarray:
    """A batch image ([S, S] or [S, S, 1]: normalised float, (x - mean) / std, or integer)
    -> uint8 [S, S]: x, the [0, 1] intensity the pipeline decoded, clipped to [0, 1] and
    scaled to 0..255."""
    image = np.asarray(image)
    x = batch_schema.intensities(image.reshape(image.shape[:2]), image_mean, image_std)
    return np.round(np.clip(x, 0.0, 1.0) * 255).astype(np.uint8)


def intensity_note(image: np.ndarray, image_mean: float, image_std: float) -> str:
    """The range of an image's [0, 1] intensities, and the share outside [0, 1] (which
    the display clips)."""
    x = batch_schema.intensities(image, image_mean, image_std)
    note = f"intensity {x.min():.2f} to {x.max():.2f}"
    clipped = float(np.mean((x < 0) | (x > 1)))
    return note + (f", {clipped:.0%} clipped" if clipped else "")


def num_pieces(tokens: np.ndarray) -> int:
    """The text pieces of a token row: ids before the first EOS, BOS and padding left out."""
    count = 0
    for token in np.asarray(tokens).tolist():
        if token == EOS_ID:
            break
        count += token not in (BOS_ID, PAD_ID)
    return count


def is_full(tokens: np.ndarray) -> bool:
    """True when a token row has no padding left (its text may have been cut)."""
    return bool(np.asarray(tokens)[-1] != PAD_ID)


def truncation_marker(tokens: np.ndarray, full_tokens: np.ndarray | None) -> str:
    """"" when `tokens` (a row of `data.max_text_len`) hold the whole text, else
    "[+N tokens cut at max_text_len=L]". `full_tokens`: the same text read with room for
    `FULL_TEXT_LEN` tokens (None: `tokens` is not full, nothing was cut); when that row
    is full too, N is a lower bound ("+N or more")."""
    if full_tokens is None:
        return ""
    cut = num_pieces(full_tokens) - num_pieces(tokens)
    if cut <= 0:
        return ""
    more = " or more" if is_full(full_tokens) else ""
    return f"[+{cut}{more} tokens cut at max_text_len={len(tokens)}]"


@dataclasses.dataclass
class Tile:
    """One example, ready to draw."""

    header: str
    images: list[np.ndarray]  # uint8 [S, S]: one per view; empty when skipped.
    notes: list[str]  # Flags of the row (label prompt, text only, cut), in purple.
    labels: list[str]  # LabelSummary.lines()
    intensity: str
    texts: list[tuple[str, str]]  # (decoded text, truncation marker) per text stream.


def tiles_from_rows(rows: list[dict[str, np.ndarray]], full_texts: list[list | None],
                    tokenizer, data_config: ml_collections.ConfigDict) -> list[Tile]:
    """Rows of pipeline batches (one dict per row) -> tiles. `full_texts[i][k]`: the
    uncut token row of text stream k of row i (None where it was not cut)."""
    mean, std = data_config.image_mean, data_config.image_std
    tiles = []
    for i, (row, full) in enumerate(zip(rows, full_texts, strict=True)):
        view = row["view"].decode() if "view" in row else ""
        header = " ".join(part for part in (f"#{i}", view, f"study {row['study_id']}") if part)
        if not row["mask"]:
            tiles.append(Tile(header, [], ["skipped by the pipeline (image not an intact "
                                           "PNG, or an empty text)"], [], "", []))
            continue
        images = [row[name] for name in ("image", "image2") if name in row]
        texts = []
        for k, name in enumerate(name for name in ("tokens", "tokens2") if name in row):
            texts.append((tokenizer.decode(row[name]),
                          truncation_marker(row[name], full[k] if full else None)))
        notes = []
        if row.get("label_prompt", False):
            notes.append("text: the labels as a prompt")
        if not row.get("image_mask", True):
            notes.append("text only: the image is not in the loss")
        if any(marker for _, marker in texts):
            notes.append("text cut")
        if len(images) > 1:
            notes.append("two views: image | image2")
        tiles.append(Tile(
            header, [display_intensities(x, mean, std) for x in images], notes,
            label_summary(row["labels"], row["labels_present"]).lines(),
            "; ".join(intensity_note(x, mean, std) for x in images), texts))
    return tiles


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the bitmap font.
        return ImageFont.load_default()


def wrap(text: str, font, width: int) -> list[str]:
    """`text` cut into lines of at most `width` pixels, between words where possible."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if font.getlength(candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        while font.getlength(word) > width:  # A word wider than the line: split it.
            fits = max([c for c in range(1, len(word)) if font.getlength(word[:c]) <= width],
                       default=1)
            lines.append(word[:fits])
            word = word[fits:]
        line = word
    if line:
        lines.append(line)
    return lines


def tile_size(image_px: int, views: int) -> tuple[int, int]:
    """(width, height) in pixels of one tile of `views` images of `image_px` square."""
    width = 2 * PAD + views * image_px + views * GAP + TEXT_WIDTH
    height = 2 * PAD + max(image_px, MIN_TEXT_LINES * LINE_HEIGHT)
    return width, height


def draw_grid(tiles: Sequence[Tile], *, cols: int, image_px: int, views: int) -> Image.Image:
    """The tiles on a white RGB canvas, `cols` to a row, each `tile_size` big."""
    width, height = tile_size(image_px, views)
    cols = min(cols, len(tiles))
    rows = math.ceil(len(tiles) / cols)
    canvas = Image.new("RGB", (cols * width, rows * height), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font()
    for i, tile in enumerate(tiles):
        left, top = (i % cols) * width, (i // cols) * height
        draw.rectangle([left, top, left + width - 1, top + height - 1], outline=(210, 210, 210))
        x = left + PAD
        for image in tile.images or [None] * views:
            if image is None:
                draw.rectangle([x, top + PAD, x + image_px - 1, top + PAD + image_px - 1],
                               fill=(190, 190, 190))
            else:
                resample = (Image.Resampling.NEAREST if image_px >= image.shape[0]
                            else Image.Resampling.LANCZOS)
                canvas.paste(Image.fromarray(image, "L").resize((image_px, image_px),
                                                                resample).convert("RGB"),
                             (x, top + PAD))
            x += image_px + GAP
        _draw_text(draw, font, tile, x, top + PAD, top + height - PAD)
    return canvas


def _draw_text(draw: ImageDraw.ImageDraw, font, tile: Tile, x: int, y: int, bottom: int
               ) -> None:
    """The tile's header, notes, labels and texts from (x, y) down, cut at `bottom` (a
    text that does not fit ends with "..."; its cut marker is in the notes anyway)."""
    lines: list[tuple[str, tuple[int, int, int]]] = [(tile.header, _BLACK)]
    lines += [(line, _NOTE_COLOR) for note in tile.notes for line in wrap(note, font,
                                                                          TEXT_WIDTH)]
    for label in tile.labels:
        lines += [(line, _LABEL_COLORS.get(label[:1], _GRAY))
                  for line in wrap(label, font, TEXT_WIDTH)]
    if tile.intensity:
        lines += [(line, _GRAY) for line in wrap(tile.intensity, font, TEXT_WIDTH)]
    for k, (text, marker) in enumerate(tile.texts):
        prefix = f"text {k + 1}: " if len(tile.texts) > 1 else ""
        body = prefix + (text or "(empty text)")
        lines += [(line, _BLACK) for line in wrap(body, font, TEXT_WIDTH)]
        lines += [(line, _RED) for line in wrap(marker, font, TEXT_WIDTH)]
    room = max(1, (bottom - y) // LINE_HEIGHT)
    if len(lines) > room:
        lines = lines[:room - 1] + [("...", _GRAY)]
    for line, color in lines:
        draw.text((x, y), line, fill=color, font=font)
        y += LINE_HEIGHT


def local_batch(global_batch_size: int, n: int) -> tuple[int, int]:
    """(process_count, rows per process): the fewest rows per process, a divisor of
    `global_batch_size`, that hold `n` rows (all of them when n exceeds the batch), so
    process 0's rows are the first rows of each global batch and no more are decoded."""
    for rows in range(1, global_batch_size + 1):
        if global_batch_size % rows == 0 and rows >= min(n, global_batch_size):
            return global_batch_size // rows, rows
    raise ValueError(f"global_batch_size {global_batch_size} must be positive")


def read_rows(data_config: ml_collections.ConfigDict, builder, tokenizer, split: str, *,
              n: int, train: bool, seed: int, global_batch_size: int, step: int
              ) -> list[dict[str, np.ndarray]]:
    """Up to `n` rows (one dict of numpy values each) of `pipeline.make_dataset`: training
    from global batch `step` on, else records [step * n, (step + 1) * n) (padding rows
    past the end of the split left out)."""
    from input_pipeline import pipeline

    if not train:
        global_batch_size = n
    processes, per_process = local_batch(global_batch_size, n)
    dataset = pipeline.make_dataset(
        data_config, builder, tokenizer, split, global_batch_size=global_batch_size,
        train=train, seed=seed, process_index=0, process_count=processes, start_step=step)
    rows = []
    for batch in dataset.take(math.ceil(n / per_process)).as_numpy_iterator():
        for i in range(per_process):
            if batch["mask"][i] or batch["num_skipped"][i]:  # Not a padding row.
                rows.append({name: value[i] for name, value in batch.items()})
    return rows[:n]


def full_token_rows(rows: list[dict[str, np.ndarray]], read_full, tokenizer_path: str
                    ) -> list[list | None]:
    """Per row, the uncut token row of each of its text streams, or None where no stream
    is full (nothing can have been cut). `read_full()`: the same rows read again with
    room for `FULL_TEXT_LEN` tokens (training texts are drawn per row, so they are read
    again rather than re-encoded); evaluation rows hold their text and are re-encoded."""
    from input_pipeline.tokenizer import Tokenizer

    names = [name for name in ("tokens", "tokens2") if rows and name in rows[0]]
    if not any(row["mask"] and is_full(row[name]) for row in rows for name in names):
        return [None] * len(rows)
    if "text" in rows[0]:  # Evaluation: the normalised text is in the batch.
        long = Tokenizer(tokenizer_path, FULL_TEXT_LEN)
        return [[long.encode_normalized([row["text"].decode()])[0]] if is_full(row["tokens"])
                else None for row in rows]
    again = read_full()
    return [[long[name] for name in names] if any(is_full(row[name]) for name in names)
            else None for row, long in zip(rows, again, strict=True)]


@dataclasses.dataclass
class Preview:
    """What `preview` read: the tiles to draw, images per tile and a one-line summary."""

    tiles: list[Tile]
    views: int
    summary: str


def preview(config: ml_collections.ConfigDict, *, split: str, n: int, train: bool,
            step: int) -> Preview:
    """`n` examples of `split` read through the pipeline, as tiles (see the module
    docstring)."""
    from input_pipeline import pipeline
    from input_pipeline import tokenizer as tokenization
    from input_pipeline.augment import AugmentConfig

    data = pipeline.complete_data(config.data)
    data.max_bad_fraction = 1.0  # Skipped rows are shown, not counted against a limit.
    builder = pipeline.build_dataset(data)
    if split.split("[")[0] not in builder.info.splits:
        raise ValueError(f"split {split!r} not in {sorted(builder.info.splits)}")
    try:
        tokenizer = tokenization.ensure_tokenizer(data, builder)
    except RuntimeError as e:  # SentencePiece found no text to train on.
        path = tokenization.tokenizer_path(data, builder)
        raise ValueError(
            f"no tokenizer at {path}, and none can be trained on the train split's reports "
            f"of {builder.name} ({str(e).strip()}); label-only data has none: train one on "
            "data with reports and write it there, e.g. python -m "
            f"input_pipeline.train_tokenizer --config <experiment with reports> --out {path}"
        ) from None
    seed = config.get("seed", 0)
    global_batch_size = config.get("global_batch_size") or n
    kwargs = dict(split=split, n=n, train=train, seed=seed,
                  global_batch_size=global_batch_size, step=step)
    rows = read_rows(data, builder, tokenizer, **kwargs)
    if not rows:
        raise ValueError(f"split {split!r} has no records from {step * n} on")
    if not any(row["mask"] for row in rows):
        raise ValueError(
            f"all {len(rows)} rows read were skipped by the pipeline: their images are not "
            "intact PNGs or, in training, their texts are empty; records without a report "
            "(chexpert) have a text only with data.decoupled (add --config.data.decoupled={} "
            "to turn their labels into text), or see them as evaluation does with --eval")

    def read_full():
        long = data.copy_and_resolve_references()
        long.max_text_len = FULL_TEXT_LEN
        return read_rows(long, builder, tokenization.Tokenizer(tokenizer.model_path,
                                                               FULL_TEXT_LEN), **kwargs)

    full = full_token_rows(rows, read_full, tokenizer.model_path)
    tiles = tiles_from_rows(rows, full, tokenizer, data)
    skipped = sum(not row["mask"] for row in rows)
    cut = sum(any(marker for _, marker in tile.texts) for tile in tiles)
    how = "as evaluation reads them"
    if train:
        augmented = AugmentConfig.from_config(data.augment).enabled
        how = f"as training reads them ({'augmented' if augmented else 'no data.augment'})"
    summary = (f"{len(rows)} examples of {builder.name} {split} {how}: {cut} texts cut at "
               f"max_text_len={data.max_text_len}, {skipped} skipped")
    return Preview(tiles, 2 if "image2" in rows[0] else 1, summary)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m input_pipeline.preview",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True,
                        help="experiment file, path/to/experiment.py[:arg]")
    parser.add_argument("--split", default="train", help="split to show")
    parser.add_argument("--n", type=int, default=16, help="examples to show")
    parser.add_argument("--step", type=int, default=0,
                        help="training: the global batch to show; else records from step*n")
    parser.add_argument("--eval", action="store_true",
                        help="read --split as evaluation does (the default but for train)")
    parser.add_argument("--cols", type=int, default=None,
                        help="tiles per row (default: about the square root of --n)")
    parser.add_argument("--image-px", type=int, default=192, help="shown size of an image")
    parser.add_argument("--out", default="preview.png", help="the PNG to write")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    from input_pipeline import cli_errors
    from jaxmedclip import config_lib

    overrides = config_lib.override_flags(parser, rest)
    for name in ("n", "image_px"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1")
    if args.step < 0 or (args.cols is not None and args.cols < 1):
        raise SystemExit("error: --step must be at least 0 and --cols at least 1")
    train = args.split.split("[")[0] == "train" and not args.eval
    with cli_errors.exit_on_user_error():
        config = config_lib.config_from_flags(args.config, overrides, required=False)
        shown = preview(config, split=args.split, n=args.n, train=train, step=args.step)
        grid = draw_grid(shown.tiles, cols=args.cols or math.ceil(math.sqrt(args.n)),
                         image_px=args.image_px, views=shown.views)
        grid.save(args.out, format="PNG")
    print(shown.summary)
    print(f"grid: {args.out} ({grid.width}x{grid.height})")


if __name__ == "__main__":
    main()
