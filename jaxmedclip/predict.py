"""Prediction entry point: images -> zero-shot finding probabilities in a CSV.

  python -m jaxmedclip.predict --config experiments/tiny_synthetic.py \
      (--workdir /tmp/tiny [--checkpoint STEP] | --hf /tmp/cxr_clip) \
      (--images PATH... | --manifest images.csv [--image_column image]) \
      --out predictions.csv [--report report.json] [--config.eval.batch_size=256 ...]

The model is a checkpoint of `--workdir` (default: the latest) with the tokenizer training
recorded there, or a folder `python -m jaxmedclip.export` wrote (`--hf`; `--config` must
be the one it was trained with: it gives the image size, normalisation and prompts).

For every image, the probability of each of `eval.zero_shot_findings` exactly as
evaluation computes it (`evaluation.zero_shot_head`: the finding's positive against its
negative prompt ensemble, at the model's logit scale). Images are read as the dataset
builders read them (`input_pipeline.images`: JPEG, 8/16-bit PNG, DICOM, downscaled to
`data.source_max_size`) and preprocessed as evaluation preprocesses them
(`input_pipeline.stages.pixels.pixels_preprocess`, `image_preprocess` without the PNG
round trip), then embedded in batches of
`eval.batch_size` sharded over the mesh (`evaluation.embed.Embedder`).

Columns: `image` (the path as given), then per finding `<slug>_probability` and, when an
evaluation report of the checkpoint holds validation-chosen thresholds,
`<slug>_present` ("yes" at probability >= threshold, else "no"), then `error`: why the
image could not be read (its other cells are empty). The report is
`<workdir>/eval/<STEP>/report.json` (`python -m jaxmedclip.evaluate`) or, failing that,
one the training loop wrote under `<workdir>/eval/<STEP>/<split>/`; `--report` names one
(with `--hf`, the only way to get the yes/no columns).

`--images` takes files and folders (their .png, .jpg, .jpeg, .dcm and .dicom files,
recursively, sorted); `--manifest` a CSV whose `--image_column` holds image paths,
absolute or relative to the CSV's folder (";" joins several, as in csv_manifest). One
process; the mesh is the config's over this process's devices.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import ml_collections
import numpy as np

from jaxmedclip import config_lib, evaluate, evaluation, models, parallel, training
from jaxmedclip.evaluation import embed
from jaxmedclip.evaluation import report as report_lib
from jaxmedclip.evaluation.prompts import slug

log = logging.getLogger("jaxmedclip.predict")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
DEFAULT_IMAGE_COLUMN = "image"


class ImageList(NamedTuple):
    """The images to predict: `names` as the user wrote them, `paths` to read."""

    names: list[str]
    paths: list[str]


def images_from_paths(paths: Sequence[str]) -> ImageList:
    """Files as given; folders expanded to their image files (recursively, sorted)."""
    names: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(
                f
                for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                if f.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(f)
            )
            if not found:
                raise FileNotFoundError(
                    f"--images folder {path} holds no {'/'.join(IMAGE_SUFFIXES)} file"
                )
            names += found
        else:
            names.append(path)  # A missing file becomes a row with its error.
    return ImageList(names, [os.path.abspath(n) for n in names])


def images_from_manifest(manifest: str, column: str = DEFAULT_IMAGE_COLUMN) -> ImageList:
    """The paths in `column` of the CSV `manifest`, relative to its folder unless absolute."""
    if not os.path.isfile(manifest):
        raise FileNotFoundError(f"--manifest {manifest} does not exist")
    root = os.path.dirname(os.path.abspath(manifest))
    with open(manifest, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if column not in (reader.fieldnames or ()):
            raise ValueError(
                f"--manifest {manifest} has no {column!r} column (columns: "
                f"{reader.fieldnames}); name the image column with --image_column"
            )
        names = [p.strip() for row in reader for p in (row[column] or "").split(";") if p.strip()]
    return ImageList(names, [os.path.join(root, n) for n in names])


def read_image(path: str, max_size: int | None) -> tuple[np.ndarray, str]:
    """(uint16 [h, w] pixels a dataset builder would store for `path`, "") or (an empty
    [0, 0] array, why it cannot be read): `images.encode_job`'s reading and downscaling."""
    from input_pipeline import images

    try:
        return images.resize_max_side(images.load_image(path, max_size=max_size), max_size), ""
    except images.ImageDecodeError as e:
        reason = e.reason
    except Exception as e:  # Decoders raise anything (OSError, MemoryError, ...).
        lines = str(e).strip().splitlines()
        reason = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
    return np.zeros((0, 0), np.uint16), reason


def source_max_size(data_config: ml_collections.ConfigDict) -> int:
    """The longest side the builders keep (`data.source_max_size`, else their default)."""
    from input_pipeline import builder_common

    return data_config.source_max_size or builder_common.DEFAULT_SOURCE_MAX_SIZE


def image_batches(
    paths: Sequence[str], data_config: ml_collections.ConfigDict, batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of `batch_size` rows: `image` [B, S, S, 1] as evaluation feeds the model,
    `mask` (False for unreadable images and the last batch's padding) and `error`."""
    import tensorflow as tf

    from input_pipeline.stages.pixels import pixels_preprocess

    max_size = source_max_size(data_config)
    size = data_config.image_size

    def read(path: bytes) -> tuple[np.ndarray, np.ndarray]:
        pixels, error = read_image(os.fsdecode(path), max_size)
        return pixels, np.array(error.encode(), dtype=object)

    def load(path):
        pixels, error = tf.numpy_function(read, [path], [tf.uint16, tf.string],
                                          stateful=False)
        pixels = tf.reshape(pixels, [tf.shape(pixels)[0], tf.shape(pixels)[1], 1])
        ok = tf.equal(tf.strings.length(error), 0)
        image = tf.cond(
            ok,
            lambda: pixels_preprocess(pixels, data_config),
            lambda: tf.zeros([size, size, 1], tf.float32),
        )
        image.set_shape([size, size, 1])
        return {"image": image, "mask": ok, "error": error}

    dataset = (
        tf.data.Dataset.from_tensor_slices(list(paths))
        .map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
    for batch in dataset.as_numpy_iterator():
        missing = batch_size - len(batch["mask"])
        if missing:  # The last batch: padding rows, masked out.
            batch = {
                key: np.concatenate([value, np.zeros((missing, *value.shape[1:]), value.dtype)])
                for key, value in batch.items()
            }
            batch["error"][-missing:] = b""
        yield batch


class Predictions(NamedTuple):
    """Per image, in input order: embedding and probabilities (NaN where unreadable)."""

    image_emb: np.ndarray  # float32 [N, D]
    probabilities: np.ndarray  # float64 [N, C], columns = the head's findings.
    errors: list[str]  # "" where the image was read.


class LoadedModel(NamedTuple):
    """A trained model as the user-facing entry points load it (`load_model`)."""

    config: ml_collections.ConfigDict
    setup: evaluate.ModelSetup
    params: object
    tokenizer: object  # `input_pipeline.tokenizer.Tokenizer` or `FolderTokenizer`.
    name: str  # "step S of W" or the exported folder, for log lines.
    step: int | None  # The checkpoint's step; None for an exported folder.


def load_model(config: ml_collections.ConfigDict, workdir: str | None = None,
               checkpoint: int | None = None, hf: str | None = None,
               tokenizer_path: str | None = None) -> LoadedModel:
    """Checkpoint `checkpoint` (default: the latest) of `workdir` with the tokenizer the
    run recorded (or `tokenizer_path`), or the folder `hf` that `jaxmedclip.export` wrote;
    no optimizer, no train step."""
    setup = evaluate.model_setup(config)
    if hf is not None:
        if not os.path.isfile(os.path.join(hf, "config.json")):
            raise FileNotFoundError(f"--hf {hf} holds no config.json: not an export")
        params = hf_params(setup, config, hf)
        tokenizer = FolderTokenizer(hf, config.data.max_text_len)
        return LoadedModel(config, setup, params, tokenizer, hf, None)
    params, step = evaluate.restore_params(setup, workdir, checkpoint)
    from jaxmedclip import export  # Its tokenizer lookup; imports no tensorflow.

    tokenizer_path = tokenizer_path or export.find_tokenizer(workdir, config)
    if not os.path.isfile(tokenizer_path):
        raise FileNotFoundError(f"--tokenizer {tokenizer_path} does not exist")
    from input_pipeline.tokenizer import Tokenizer

    tokenizer = Tokenizer(tokenizer_path, config.data.max_text_len)
    return LoadedModel(config, setup, params, tokenizer, f"step {step} of {workdir}", step)


class Predictor:
    """A restored model with its zero-shot head, applied to image files in batches."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        setup: evaluate.ModelSetup,
        params,
        tokenizer,
    ):
        self.config = config
        self.eval_config = evaluation.eval_config(config)
        if not self.eval_config.zero_shot_findings:
            raise ValueError("eval.zero_shot_findings is empty: there is nothing to predict")
        self.batch_size = self.eval_config.batch_size
        try:
            parallel.check_batch_size(self.batch_size, setup.mesh)
        except ValueError as e:
            raise ValueError(f"eval.batch_size: {e}") from None
        self.params = params
        self.embedder = embed.Embedder(setup.model, setup.mesh, setup.rules)
        self.head = evaluation.zero_shot_head(self.eval_config, self.embedder, params, tokenizer)

    def predict(self, paths: Sequence[str], *, progress: bool = True) -> Predictions:
        """Reads, embeds and scores every image of `paths`; unreadable ones get an error."""
        image_emb, errors = embed_image_files(self.embedder, self.params, paths,
                                              self.config.data, self.batch_size,
                                              progress=progress)
        read = np.array([not e for e in errors], bool)
        probabilities = np.full((len(paths), len(self.head.findings)), np.nan)
        probabilities[read] = self.head.probabilities(image_emb[read])
        return Predictions(image_emb, probabilities, errors)


def embed_image_files(embedder: embed.Embedder, params, paths: Sequence[str],
                      data_config: ml_collections.ConfigDict, batch_size: int, *,
                      progress: bool = False) -> tuple[np.ndarray, list[str]]:
    """(float32 [N, D] image embeddings, NaN where unreadable; the reason per image, ""
    where read) of image files, read and preprocessed as evaluation does (`image_batches`)
    and embedded in batches of `batch_size` over the embedder's mesh."""
    from jaxmedclip.training.metrics import ProgressBar

    errors: list[str] = []
    bar = ProgressBar(0, -(-len(paths) // batch_size)) if progress else None

    def batches():
        for done, batch in enumerate(image_batches(paths, data_config, batch_size), 1):
            real = min(batch_size, len(paths) - len(errors))  # Not the padding rows.
            errors.extend(e.decode("utf-8", "replace") for e in batch["error"][:real])
            if bar is not None:
                bar.update(done)
            yield {"image": batch["image"], "mask": batch["mask"]}

    try:
        embedded = embedder.embed_batches(params, batches(), with_text=False)
    finally:
        if bar is not None:
            bar.clear()
    image_emb = np.full((len(paths), embedded.image_emb.shape[1]), np.nan, np.float32)
    image_emb[np.array([not e for e in errors], bool)] = embedded.image_emb
    return image_emb, errors


def find_report(workdir: str, step: int) -> str | None:
    """The evaluation report of `step` with validation-chosen thresholds: the one
    `python -m jaxmedclip.evaluate` writes, else one the training loop wrote per split."""
    directory = report_lib.report_dir(workdir, step)
    candidates = [os.path.join(directory, "report.json")]
    candidates += sorted(glob.glob(os.path.join(directory, "*", "report.json")))
    for path in candidates:
        if os.path.isfile(path) and _report_thresholds(_read_json(path)) is not None:
            return path
    return None


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _report_thresholds(report: Mapping) -> Mapping | None:
    zero_shot = report.get("zero_shot") or {}
    if not zero_shot.get("threshold_split") or "threshold" not in zero_shot:
        return None
    return zero_shot


def thresholds_from_report(path: str, head: evaluation.ZeroShotHead) -> dict[str, float | None]:
    """Each finding's threshold in the report at `path`; None (with a log line) where the
    report has none for it or chose it for other prompts than `head`'s."""
    zero_shot = _report_thresholds(_read_json(path))
    if zero_shot is None:
        raise ValueError(f"{path} holds no zero-shot thresholds chosen on a threshold split")
    out: dict[str, float | None] = {}
    for finding in head.findings:
        threshold = zero_shot["threshold"].get(finding)
        reported = zero_shot.get("prompts", {}).get(finding)
        ours = {k: list(v) for k, v in head.prompt_sets[finding]._asdict().items()}
        if threshold is None:
            log.info("%s has no threshold for %s: its yes/no column stays empty", path, finding)
        elif reported is not None and reported != ours:
            log.info(
                "%s chose the threshold of %s for other prompts than eval.prompts now gives: "
                "its yes/no column stays empty",
                path,
                finding,
            )
            threshold = None
        out[finding] = threshold
    return out


def write_csv(
    path: str,
    names: Sequence[str],
    predictions: Predictions,
    findings: Sequence[str],
    thresholds: Mapping[str, float | None] | None,
) -> None:
    """The predictions CSV (columns: see the module docstring), written atomically."""
    header = ["image"]
    for finding in findings:
        header.append(f"{slug(finding)}_probability")
        if thresholds is not None:
            header.append(f"{slug(finding)}_present")
    header.append("error")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for name, probs, error in zip(
            names, predictions.probabilities, predictions.errors, strict=True
        ):
            row = [name]
            for finding, p in zip(findings, probs, strict=True):
                row.append("" if error else f"{p:.7g}")
                if thresholds is not None:
                    threshold = thresholds.get(finding)
                    row.append(
                        "" if error or threshold is None else ("yes" if p >= threshold else "no")
                    )
            writer.writerow([*row, error])
    os.replace(tmp, path)


# model_type in an exported folder's config.json -> jaxmedclip.export's format.
HF_FORMATS = {"clip": "clip", "siglip": "siglip", "vision-text-dual-encoder": "dual_encoder"}


class FolderTokenizer:
    """An exported folder's `tokenizer.json` giving the token rows our `Tokenizer` gives:
    BOS + pieces + EOS (the folder's post-processor), truncated keeping EOS, 0-padded."""

    def __init__(self, folder: str, max_len: int):
        from tokenizers import Tokenizer

        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--hf {folder} has no tokenizer.json")
        self._tokenizer, self.max_len = Tokenizer.from_file(path), max_len

    def encode_batch(self, texts: Sequence[str]) -> np.ndarray:
        from jaxmedclip.vocabulary import EOS_ID

        tokens = np.zeros((len(texts), self.max_len), np.int32)
        for row, encoding in zip(tokens, self._tokenizer.encode_batch(list(texts)), strict=True):
            ids = encoding.ids
            if len(ids) > self.max_len:
                ids = [*ids[: self.max_len - 1], EOS_ID]
            row[: len(ids)] = ids
        return tokens


def hf_params(setup: evaluate.ModelSetup, config: ml_collections.ConfigDict, folder: str):
    """The parameters of the model exported to `folder` (`python -m jaxmedclip.export`),
    in `setup`'s shardings; `config` must describe the exported model."""
    import jax

    from jaxmedclip import export
    from jaxmedclip.convert import load_pretrained, read_safetensors
    from jaxmedclip.convert import rules as rules_lib

    with open(os.path.join(folder, "config.json")) as f:
        model_type = json.load(f).get("model_type")
    if model_type not in HF_FORMATS:
        raise ValueError(
            f"--hf {folder}: model_type {model_type!r} is not one jaxmedclip.export writes "
            f"({', '.join(HF_FORMATS)})"
        )
    _check_preprocessing(folder, config)
    host = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), setup.abstract_params)
    params = load_pretrained(host, folder, ("image", "text"), config.model)
    heads = export.layout(config, HF_FORMATS[model_type]).heads
    flat = rules_lib.flatten(params)
    tensors = read_safetensors(folder)
    expected = {r.ours: np.shape(flat[r.ours]) for r in heads if r.ours in flat}
    converted = rules_lib.from_hf(
        {r.theirs: tensors[r.theirs] for r in heads if r.theirs in tensors},
        list(heads),
        expected,
        what=f"{folder} (heads)",
    )
    # The logit bias only shifts both logits of a zero-shot pair alike: CLIP folders lack it.
    # Exports hold no local alignment parameters (zeros here): only grounding reads them,
    # and `ground` refuses such maps from a folder.
    unset = sorted(
        k for k in flat if not k.startswith(("image_tower/", "text_tower/", "bias"))
        and k.split("/")[0] not in models.LOCAL_PARAMS and k not in converted
    )
    if unset:
        raise ValueError(f"--hf {folder} holds no weights for {unset} of the configured model")
    flat.update({k: np.asarray(v, flat[k].dtype) for k, v in converted.items()})
    return jax.device_put(rules_lib.unflatten(flat), setup.param_shardings)


def _check_preprocessing(folder: str, config: ml_collections.ConfigDict) -> None:
    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        processor = json.load(f)
    size = processor.get("size", {}).get("height")
    data = config.data
    ours = (data.image_size, float(data.image_mean), float(data.image_std))
    theirs = (size, *(float(v[0]) for v in (processor["image_mean"], processor["image_std"])))
    if not np.allclose(ours[1:], theirs[1:]) or ours[0] != theirs[0]:
        raise ValueError(
            f"--hf {folder} was exported with image size, mean, std {theirs}; the config has "
            f"{ours}: pass the config it was trained with"
        )


def add_model_flags(parser: argparse.ArgumentParser, *, exported: bool = True) -> None:
    """The flags naming the model `load_model` loads: --config, --workdir, --checkpoint,
    --tokenizer and, with `exported`, --hf (an exported folder instead of --workdir; then
    `check_model_flags` checks that exactly one is given)."""
    parser.add_argument("--config", required=True, help="experiment file, e.g. experiments/x.py")
    parser.add_argument("--workdir", required=not exported, default=None,
                        help="the training run's workdir")
    parser.add_argument(
        "--checkpoint", type=int, default=None, help="step of --workdir (default: latest)"
    )
    if exported:
        parser.add_argument(
            "--hf", default=None, help="instead of --workdir: a folder jaxmedclip.export wrote"
        )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="SentencePiece .model (default: <workdir>/tokenizer.model, recorded by training)",
    )


def check_model_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exactly one of --workdir and --hf; --checkpoint and --tokenizer only with --workdir."""
    if (args.workdir is None) == (args.hf is None):
        parser.error("give exactly one of --workdir (a training run) and --hf (an exported folder)")
    if args.hf is not None and (args.checkpoint is not None or args.tokenizer is not None):
        parser.error("--checkpoint and --tokenizer go with --workdir; --hf holds both")


def parse_flags(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m jaxmedclip.predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    add_model_flags(parser)
    parser.add_argument("--images", nargs="+", default=None, help="image files or folders")
    parser.add_argument("--manifest", default=None, help="CSV with an image path column")
    parser.add_argument("--image_column", default=DEFAULT_IMAGE_COLUMN, help="of --manifest")
    parser.add_argument("--out", required=True, help="predictions CSV to write")
    parser.add_argument(
        "--report",
        default=None,
        help="report.json whose thresholds give the yes/no columns (default: the "
        "checkpoint's under <workdir>/eval/<STEP>/)",
    )
    args, rest = parser.parse_known_args(argv)
    if (args.images is None) == (args.manifest is None):
        parser.error("give exactly one of --images PATH... and --manifest CSV")
    check_model_flags(parser, args)
    return args, config_lib.override_flags(parser, rest)


def main(argv: Sequence[str] | None = None) -> Predictions:
    """Writes the predictions CSV; returns the predictions."""
    training.console_logging(sys.stdout)
    args, overrides = parse_flags(sys.argv[1:] if argv is None else argv)
    try:
        config = config_lib.config_from_flags(args.config, overrides)
        if args.images is not None:
            images = images_from_paths(args.images)
        else:
            images = images_from_manifest(args.manifest, args.image_column)
        if not images.paths:
            raise ValueError(f"--manifest {args.manifest} lists no image")
        if args.report is not None and not os.path.isfile(args.report):
            raise FileNotFoundError(f"--report {args.report} does not exist")
        model = load_model(config, args.workdir, args.checkpoint, args.hf, args.tokenizer)
        step = model.step
        report = args.report
        if report is None and args.hf is None:
            report = find_report(args.workdir, step)
        predictor = Predictor(config, model.setup, model.params, model.tokenizer)
        thresholds = None if report is None else thresholds_from_report(report, predictor.head)
    except (ValueError, KeyError, FileNotFoundError, AttributeError) as e:
        raise SystemExit(f"error: {e}") from None
    if thresholds is None:
        where = (
            "no --report given"
            if args.hf is not None
            else "no evaluation report with thresholds for step "
            f"{step} under {report_lib.report_dir(args.workdir, step)} (run python -m "
            "jaxmedclip.evaluate first, or pass --report)"
        )
        log.info("%s: no yes/no columns", where)
    else:
        log.info("yes/no at the thresholds of %s", report)
    log.info("predicting %d images with %s", len(images.paths), model.name)
    start = time.perf_counter()
    predictions = predictor.predict(images.paths)
    seconds = time.perf_counter() - start
    write_csv(args.out, images.names, predictions, predictor.head.findings, thresholds)
    unreadable = sum(bool(e) for e in predictions.errors)
    log.info(
        "wrote %s: %d images in %.1f s (%.1f images/s), %d unreadable%s",
        args.out,
        len(images.paths),
        seconds,
        len(images.paths) / seconds,
        unreadable,
        " (reasons in the error column)" if unreadable else "",
    )
    return predictions


if __name__ == "__main__":
    main()
