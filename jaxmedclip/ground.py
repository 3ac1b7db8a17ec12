"""Phrase grounding entry point: where in an image a phrase's map peaks, as a PNG, and
grounding metrics of phrase-box annotations (MS-CXR's CSV layout).

  python -m jaxmedclip.ground --config experiments/tiny_synthetic.py \
      (--workdir /tmp/tiny [--checkpoint STEP] | --hf /tmp/cxr_clip) \
      --phrase "left pleural effusion" [--phrase ...] --image x.dcm [--image ...] \
      --out map.png

  python -m jaxmedclip.ground --config ... --workdir /tmp/tiny \
      --boxes MS_CXR_Local_Alignment_v1.1.0.csv --images-root /data/mimic-cxr-jpg \
      [--split test] [--out metrics.json]

Maps: `evaluation.grounding` (patch-token similarity for plain CLIP towers, word-region
attention for models trained with `loss.local`), upsampled to the model's input. The
model is loaded as `python -m jaxmedclip.predict` loads it (a checkpoint of `--workdir`
with its recorded tokenizer, or a folder `jaxmedclip.export` wrote), and images are read
and preprocessed as it reads them (`predict.read_image`, `pixels_preprocess`): what the
overlay shows is the model's input.

`--out` (phrases and images): one PNG, a grid with a row per image and a column per
phrase; each tile is the grayscale input under the map (colour scale from the map's own
minimum to maximum), its maximum marked with a cross, the phrase as caption. An image
that cannot be read stops the command with one line naming it.

`--boxes`: a CSV with MS-CXR's columns `path` (relative to `--images-root`),
`label_text` (the phrase), `category_name` (the label metrics are grouped by), `x`, `y`,
`w`, `h` (a box in pixels of the original image), `image_width`, `image_height`, and
optionally `split` (`--split` keeps those rows). The boxes of one (image, phrase) are
one region. Prints the pointing game, CNR and their baselines per label (see
`evaluation.grounding`) and writes them as JSON to `--out` if given; unreadable images
are skipped and counted.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import textwrap
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from jaxmedclip import batch_schema, config_lib, evaluation, predict, training
from jaxmedclip.evaluation import grounding
from jaxmedclip.evaluation import report as report_lib

log = logging.getLogger("jaxmedclip.ground")

BOX_COLUMNS = ("path", "label_text", "x", "y", "w", "h", "image_width", "image_height")


def model_input(pixels: np.ndarray, data_config) -> np.ndarray:
    """uint16 [h, w] pixels (`predict.read_image`) -> float32 [S, S, 1] as evaluation feeds
    the model (`pixels_preprocess`)."""
    from input_pipeline.stages.pixels import pixels_preprocess

    return np.asarray(pixels_preprocess(pixels[..., None], data_config), np.float32)


def read_model_input(path: str, data_config) -> tuple[np.ndarray | None, np.ndarray | None,
                                                       str]:
    """(pixels, model input, "") of the image at `path`, or (None, None, why not)."""
    pixels, error = predict.read_image(path, predict.source_max_size(data_config))
    if error:
        return None, None, error
    return pixels, model_input(pixels, data_config), ""


def phrase_maps(model: predict.LoadedModel, images: np.ndarray, phrases: Sequence[str]
                ) -> np.ndarray:
    """float32 [N, S, S]: the map of phrases[n] over images[n] (model inputs [N, S, S, 1])."""
    cfg = evaluation.eval_config(model.config)
    grounder = grounding.grounder_for(model.config, model.setup.model, model.setup.mesh,
                                      model.setup.rules, model.tokenizer)
    distinct, index, weights = grounding.phrase_table({p: (p,) for p in phrases}, phrases)
    return grounder.maps(model.params, images, model.tokenizer.encode_batch(distinct), index,
                         weights, batch_size=cfg.batch_size)


# ---------------------------------------------------------------------------------- overlays


def display_image(model_image: np.ndarray, data_config) -> np.ndarray:
    """A model input [S, S, 1] back in [0, 1] intensities, for display."""
    image = batch_schema.intensities(model_image[..., 0], data_config.image_mean,
                                     data_config.image_std)
    return np.clip(image, 0.0, 1.0)


def write_overlays(path: str, images: np.ndarray, maps: np.ndarray,
                   row_names: Sequence[str], phrases: Sequence[str],
                   regions: np.ndarray | None = None, dpi: int = 100) -> None:
    """A PNG grid: images [R, S, S] in [0, 1] (rows) under maps [R, C, S, S] of phrases [C]
    (columns), each map coloured from its minimum to its maximum, its maximum marked;
    `regions` bool [R, C, S, S] (optional) outlined."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, cols = maps.shape[:2]
    fig = Figure(figsize=(2.6 * cols, 2.8 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax, heat = axes[r, c], maps[r, c]
            ax.imshow(images[r], cmap="gray", vmin=0, vmax=1, interpolation="bilinear")
            ax.imshow(heat, cmap="jet", alpha=0.45, interpolation="bilinear",
                      vmin=float(heat.min()), vmax=float(heat.max()) + 1e-12)
            if regions is not None and regions[r, c].any():
                ax.contour(regions[r, c].astype(float), levels=[0.5], colors="white",
                           linewidths=1.2)
            y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
            ax.plot([x], [y], marker="x", color="white", markersize=9, markeredgewidth=2)
            ax.set_title("\n".join(textwrap.wrap(phrases[c], 28)), fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(textwrap.shorten(row_names[r], 32, placeholder="..."),
                              fontsize=8)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=dpi)


# ------------------------------------------------------------------------------- box regions


class BoxRegion(NamedTuple):
    """The boxes of one (image, phrase) of a box CSV."""

    path: str  # As written in the CSV.
    phrase: str
    label: str
    boxes: list[tuple[float, float, float, float]]  # x, y, w, h in original pixels.
    image_size: tuple[float, float]  # Original (width, height).


def read_boxes(csv_path: str, split: str | None = None) -> list[BoxRegion]:
    """The regions of a CSV in MS-CXR's layout (module doc), one per (path, phrase), in
    the order they first appear."""
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"--boxes {csv_path} does not exist")
    regions: dict[tuple[str, str], BoxRegion] = {}
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in BOX_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"--boxes {csv_path} lacks the columns {missing} (columns: "
                             f"{reader.fieldnames}); expected MS-CXR's {list(BOX_COLUMNS)}")
        if split is not None and "split" not in reader.fieldnames:
            raise ValueError(f"--split {split}: --boxes {csv_path} has no split column")
        for line, row in enumerate(reader, start=2):
            if split is not None and row["split"].strip() != split:
                continue
            try:
                box = tuple(float(row[k]) for k in ("x", "y", "w", "h"))
                size = (float(row["image_width"]), float(row["image_height"]))
            except ValueError as e:
                raise ValueError(f"--boxes {csv_path} line {line}: {e}") from None
            if min(size) <= 0 or box[2] <= 0 or box[3] <= 0:
                raise ValueError(f"--boxes {csv_path} line {line}: box {box} in an image of "
                                 f"{size} is empty")
            path, phrase = row["path"].strip(), row["label_text"].strip()
            label = (row.get("category_name") or "").strip() or phrase
            key = (path, phrase)
            if key not in regions:
                regions[key] = BoxRegion(path, phrase, label, [], size)
            regions[key].boxes.append(box)
    if not regions:
        raise ValueError(f"--boxes {csv_path} holds no row" + (
            f" of split {split!r}" if split is not None else ""))
    return list(regions.values())


def box_mask(region: BoxRegion, pixels_shape: tuple[int, int], size: int) -> np.ndarray:
    """bool [S, S]: the boxes of `region` in the model's input, for an image read as
    `pixels_shape` (h, w) (the original, maybe downscaled): drawn at that size, then
    resized with the image's resize-with-pad. A box too small to cover half a pixel
    there keeps the pixel it covers most."""
    height, width = pixels_shape
    original_width, original_height = region.image_size
    mask = np.zeros((height, width), np.float32)
    for x, y, w, h in region.boxes:
        x0, x1 = x / original_width * width, (x + w) / original_width * width
        y0, y1 = y / original_height * height, (y + h) / original_height * height
        # Pixel coverage of the box along each axis (pixel i spans [i, i + 1)).
        cover_x = np.clip(np.minimum(np.arange(1, width + 1), x1)
                          - np.maximum(np.arange(width), x0), 0, 1)
        cover_y = np.clip(np.minimum(np.arange(1, height + 1), y1)
                          - np.maximum(np.arange(height), y0), 0, 1)
        mask = np.maximum(mask, cover_y[:, None] * cover_x[None, :])
    from input_pipeline.stages.pixels import resize_with_pad

    resized = np.asarray(resize_with_pad(mask[..., None], size))[..., 0]
    out = resized >= 0.5
    if not out.any():
        out = resized == resized.max()
    return out


def box_metrics(model: predict.LoadedModel, regions: Sequence[BoxRegion], images_root: str
                ) -> dict:
    """Pointing game, CNR and baselines per label of `regions` (`grounding.metrics_by_group`)
    plus `skipped`: the images that could not be read."""
    size = model.config.data.image_size
    inputs, masks, phrases, labels, skipped = [], [], [], [], []
    cache: dict[str, tuple] = {}
    for region in regions:
        path = os.path.join(images_root, region.path)
        if path not in cache:
            cache[path] = read_model_input(path, model.config.data)
        pixels, image, error = cache[path]
        if error:
            skipped.append({"path": region.path, "error": error})
            continue
        inputs.append(image)
        masks.append(box_mask(region, pixels.shape, size))
        phrases.append(region.phrase)
        labels.append(region.label)
    if not inputs:
        first = skipped[0]
        raise ValueError(f"no image of --boxes could be read (first: {first['path']}: "
                         f"{first['error']}); check --images-root")
    maps = phrase_maps(model, np.stack(inputs), phrases)
    sigma = grounding.map_spread(model.config)
    out = grounding.metrics_by_group(maps, np.stack(masks), labels,
                                     grid=grounding.patch_grid(model.config), sigma=sigma)
    out["map"] = grounding.map_kind(model.config)
    out["spread"] = sigma
    out["num_regions"] = len(inputs)
    out["skipped"] = skipped
    return out


# ------------------------------------------------------------------------------------- CLI


def parse_flags(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m jaxmedclip.ground",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    predict.add_model_flags(parser)
    parser.add_argument("--phrase", action="append", default=[], help="a phrase (repeatable)")
    parser.add_argument("--image", action="append", default=[], help="an image (repeatable)")
    parser.add_argument("--boxes", default=None, help="phrase-box CSV in MS-CXR's layout")
    parser.add_argument("--images-root", default=None, help="folder the --boxes paths are in")
    parser.add_argument("--split", default=None, help="keep the --boxes rows of this split")
    parser.add_argument("--out", default=None,
                        help="the PNG to write (phrases and images); the metrics JSON "
                             "(--boxes, optional)")
    args, rest = parser.parse_known_args(argv)
    predict.check_model_flags(parser, args)
    if args.boxes is not None:
        if args.phrase or args.image:
            parser.error("--boxes takes its phrases and images from the CSV: drop --phrase "
                         "and --image")
        if args.images_root is None:
            parser.error("--boxes needs --images-root, the folder its paths are relative to")
    else:
        if not args.phrase or not args.image or args.out is None:
            parser.error("give --phrase, --image (each repeatable) and --out map.png, or "
                         "--boxes CSV --images-root DIR")
        if args.images_root is not None or args.split is not None:
            parser.error("--images-root and --split go with --boxes")
    return args, config_lib.override_flags(parser, rest)


def box_table(result: dict) -> str:
    """The console table of `box_metrics`."""
    lines = grounding.summary_lines({"map": result["map"], "per_finding": result["per_finding"],
                                     "mean": result["mean"]})
    lines[0] = lines[0].replace("grounding", f"grounding of {result['num_regions']} regions", 1)
    lines[1] = lines[1].replace("finding ", "label   ", 1)
    if result["skipped"]:
        first = result["skipped"][0]
        lines.append(f"skipped {len(result['skipped'])} unreadable images (first: "
                     f"{first['path']}: {first['error']})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict | np.ndarray:
    """Writes the overlay PNG (returns the maps [images, phrases, S, S]) or, with
    --boxes, prints the metrics (returns them)."""
    training.console_logging(sys.stdout)
    args, overrides = parse_flags(sys.argv[1:] if argv is None else argv)
    try:
        config = config_lib.config_from_flags(args.config, overrides)
        regions = read_boxes(args.boxes, args.split) if args.boxes is not None else None
        if args.hf is not None and grounding.map_kind(config) != "patch_similarity":
            raise ValueError(
                f"{grounding.map_kind(config).replace('_', ' ')} maps come from the local "
                "alignment's parameters, which exports do not hold: ground from the "
                "checkpoint (--workdir), or add --config.loss.local.weight=0 for the towers' "
                "patch-similarity maps")
        model = predict.load_model(config, args.workdir, args.checkpoint, args.hf,
                                   args.tokenizer)
        if regions is not None:
            result = box_metrics(model, regions, args.images_root)
        else:
            images = []
            for path in args.image:
                _, image, error = read_model_input(path, config.data)
                if error:
                    raise ValueError(f"cannot read --image {path}: {error}")
                images.append(image)
            phrases = list(args.phrase)
            pairs = [(i, p) for i in range(len(images)) for p in phrases]
            maps = phrase_maps(model, np.stack([images[i] for i, _ in pairs]),
                               [p for _, p in pairs])
    except (ValueError, KeyError, FileNotFoundError, AttributeError) as e:
        raise SystemExit(f"error: {' '.join(str(e).split())}") from None
    if regions is not None:
        print(box_table(result), flush=True)
        if args.out is not None:
            report_lib.write_json(os.path.abspath(args.out), result)
            log.info("wrote %s", args.out)
        return result
    maps = maps.reshape(len(images), len(phrases), *maps.shape[1:])
    write_overlays(args.out, np.stack([display_image(x, config.data) for x in images]), maps,
                   [os.path.basename(p) for p in args.image], phrases)
    log.info("wrote %s: %d images x %d phrases, %s maps of %s", args.out, len(images),
             len(phrases), grounding.map_kind(config).replace("_", " "), model.name)
    return maps


if __name__ == "__main__":
    main()
