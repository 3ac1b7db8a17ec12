"""Where a trained model's grounding maps peak, per finding: hits, near misses, a picture.

  python benchmarks/grounding_maps.py --config experiments/tiny_synthetic.py \
      --workdir /tmp/jaxmedclip_tiny [--checkpoint STEP] [--split test] \
      [--out docs/img/grounding_findings.png]

On a split whose records mark the findings' regions (synthetic_cxr >= 1.5.0), the maps
`evaluate` scores (`evaluation.grounding`): for each localised finding, the pointing
game (the map's maximum inside the region), how far outside the region the misses peak
(the peak's distance to the nearest region pixel, in input pixels), and the hit rate
of frontal and lateral views apart. With --out, a picture: for each finding, its first
positive images with the region shaded and the map with its peak marked.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxmedclip import config_lib  # noqa: E402  (imports no jax: devices are set first)


def peak_distances(maps: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """float [N]: distance in pixels from each map's peak to its region (0: inside)."""
    from scipy import ndimage

    out = []
    for heatmap, region in zip(maps, regions, strict=True):
        y, x = np.unravel_index(np.argmax(heatmap), heatmap.shape)
        out.append(0.0 if region[y, x] else float(ndimage.distance_transform_edt(~region)[y, x]))
    return np.asarray(out)


def picture(path: str, cases, maps: np.ndarray, findings, per_finding: int = 4) -> None:
    """A row per finding: (image with its region shaded, map with its peak) pairs."""
    from PIL import Image

    rows = []
    for finding in findings:
        tiles = []
        for n in np.flatnonzero(np.asarray(cases.findings) == finding)[:per_finding]:
            image = cases.images[cases.image_index[n], :, :, 0]
            image = (image - image.min()) / max(float(np.ptp(image)), 1e-6)
            gray = np.repeat(image[..., None], 3, axis=-1)
            shaded = gray.copy()
            shaded[cases.regions[n]] = 0.45 * shaded[cases.regions[n]] + [0.55, 0.0, 0.0]
            heat = maps[n] - maps[n].min()
            heat /= max(float(heat.max()), 1e-12)
            overlay = 0.4 * gray + 0.6 * np.stack([heat, 0.3 * heat, 1 - heat], -1)
            y, x = np.unravel_index(np.argmax(maps[n]), maps[n].shape)
            overlay[max(0, y - 1):y + 2, max(0, x - 1):x + 2] = [0.0, 1.0, 0.0]
            tiles += [shaded, overlay]
        if tiles:
            width = 2 * per_finding * tiles[0].shape[1]
            row = np.concatenate(tiles, axis=1)
            rows.append(np.pad(row, ((0, 0), (0, width - row.shape[1]), (0, 0))))
    image = (np.concatenate(rows, axis=0) * 255).clip(0, 255).astype(np.uint8)
    Image.fromarray(image).resize((image.shape[1] * 3, image.shape[0] * 3),
                                  Image.NEAREST).save(path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--checkpoint", type=int, default=None)
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", default=None, help="PNG picture of the maps")
    parser.add_argument("--cpu_devices", type=int, default=8)
    args, overrides = parser.parse_known_args(argv)
    config_lib.add_cpu_devices(args.cpu_devices)
    from jaxmedclip import evaluation, predict, training
    from jaxmedclip.evaluation import grounding

    config = config_lib.config_from_flags(args.config, overrides)
    model = predict.load_model(config, args.workdir, args.checkpoint)
    cfg = evaluation.eval_config(config)
    builder, _ = training.prepare_data(config.data)
    findings = tuple(cfg.grounding_findings)
    result = grounding.finding_maps(cfg, config, model.setup.model, model.params,
                                    model.setup.mesh, builder, model.tokenizer, args.split)
    cases, maps = result.cases, result.maps
    distance = peak_distances(maps, cases.regions)
    names, views = np.asarray(cases.findings), np.asarray(cases.views)
    print(f"{result.kind.replace('_', ' ')} maps of {model.name}, split {args.split!r}")
    print(f"  {'finding':<18} {'n':>4} {'pointing':>9} {'<=4 px':>7} {'<=8 px':>7} "
          f"{'frontal':>8} {'lateral':>8}")
    rows = {}
    for finding in findings:
        d, lateral = distance[names == finding], views[names == finding] == "LATERAL"
        if not len(d):
            continue
        row = {"n": int(len(d)), "pointing_game": float(np.mean(d == 0)),
               "within_4px": float(np.mean(d <= 4)), "within_8px": float(np.mean(d <= 8)),
               "frontal": float(np.mean(d[~lateral] == 0)) if (~lateral).any() else None,
               "lateral": float(np.mean(d[lateral] == 0)) if lateral.any() else None}
        rows[finding] = row
        fmt = lambda v: "-" if v is None else f"{v:.3f}"
        print(f"  {finding:<18} {row['n']:>4} {fmt(row['pointing_game']):>9} "
              f"{fmt(row['within_4px']):>7} {fmt(row['within_8px']):>7} "
              f"{fmt(row['frontal']):>8} {fmt(row['lateral']):>8}")
    mean = float(np.mean([r["pointing_game"] for r in rows.values()]))
    print(f"  {'mean':<18} {'':>4} {mean:>9.3f}")
    if args.out:
        picture(args.out, cases, maps, findings)
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
