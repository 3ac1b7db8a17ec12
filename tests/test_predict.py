"""`python -m jaxmedclip.predict`: the probabilities evaluation computes, for image files.

One tiny training run (2 steps, with the training loop's evaluation of the validation
split at step 2, whose report holds the validation-chosen thresholds) and one prediction
run over that split's images, written out as PNG files, plus a DICOM and a JPEG of the
first one and two files that cannot be read, listed in a manifest.
"""

import csv
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm
from test_evaluate_entry import _experiment_file

from jaxmedclip import config_lib, evaluate, evaluation, export, predict
from jaxmedclip.evaluation import embed, prompts
from jaxmedclip.vocabulary import EOS_ID, FINDING_INDEX

pytest.importorskip("input_pipeline.pipeline")

STEP = 2


@pytest.fixture(scope="module")
def run(tiny_run):
    """(experiment file, workdir) of the shared 2-step run (conftest.tiny_run)."""
    experiment, workdir = tiny_run
    assert os.path.isdir(os.path.join(workdir, "checkpoints", str(STEP)))
    return experiment, workdir


@pytest.fixture(scope="module")
def validation(run):
    """The validation split as evaluation sees it: its PNG bytes, and the image embeddings
    and labels `evaluation.embed` computes from `make_dataset(train=False)`."""
    import tensorflow_datasets as tfds

    from input_pipeline import pipeline

    experiment, workdir = run
    config = config_lib.load_config(experiment)
    builder, tokenizer = pipeline.prepare(config.data)
    source = builder.as_data_source("validation", decoders={"image": tfds.decode.SkipDecoding()})
    pngs = [source[i]["image"] for i in range(len(source))]
    setup = evaluate.model_setup(config)
    params, _ = evaluate.restore_params(setup, workdir, STEP)
    cfg = evaluation.eval_config(config)
    dataset = pipeline.make_dataset(
        config.data, builder, tokenizer, "validation", global_batch_size=cfg.batch_size,
        train=False, seed=cfg.seed,
    )
    embedded = embed.Embedder(setup.model, setup.mesh, setup.rules).embed_batches(
        params, dataset.as_numpy_iterator(), with_text=False
    )
    assert embedded.num_examples == len(pngs)
    return pngs, embedded


@pytest.fixture(scope="module")
def predicted(run, validation, tmp_path_factory):
    """`python -m jaxmedclip.predict --manifest` over the validation PNGs, a DICOM and a
    JPEG of the first, an unreadable and a missing file: (returned predictions, CSV rows,
    manifest names, the images' folder)."""
    experiment, workdir = run
    pngs, _ = validation
    folder = tmp_path_factory.mktemp("images")
    (folder / "split").mkdir()
    names = []
    for i, data in enumerate(pngs):
        name = f"split/{i:03d}.png"
        (folder / name).write_bytes(data)
        names.append(name)
    first = np.asarray(Image.open(folder / names[0]))
    assert first.dtype == np.uint8  # The synthetic builder writes 8-bit PNGs.
    from fixtures_medical import write_dicom

    # 16-bit stored values with a LINEAR_EXACT window over the full range: the unit
    # intensities are value / 65535, so the pixels read are exactly the PNG's.
    write_dicom(
        str(folder / "first.dcm"),
        first.astype(np.uint16) * 257,
        window=(32767.5, 65535.0),
        voi_function="LINEAR_EXACT",
    )
    Image.fromarray(first).save(folder / "first.jpg", quality=100)
    (folder / "broken.png").write_bytes(pngs[0][: len(pngs[0]) // 2])
    names += ["first.dcm", os.path.abspath(folder / "first.jpg"), "broken.png", "absent.png"]
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["study_id", "image"])
        writer.writerows([[i, name] for i, name in enumerate(names)])
    out = folder / "out" / "predictions.csv"
    result = predict.main(
        ["--config", experiment, "--workdir", workdir, "--manifest", str(manifest),
         "--out", str(out)]
    )
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    return result, rows, names, folder


def _findings(experiment):
    return list(evaluation.eval_config(config_lib.load_config(experiment)).zero_shot_findings)


def test_split_images_get_evaluations_embeddings_and_aucs(run, validation, predicted):
    experiment, workdir = run
    pngs, embedded = validation
    result, rows, names, _ = predicted
    count = len(pngs)
    assert [row["image"] for row in rows] == names
    assert not any(result.errors[:count])
    np.testing.assert_allclose(result.image_emb[:count], embedded.image_emb, atol=1e-5)
    # The training loop's evaluation scored these images: the CSV's probabilities give
    # the AUCs of its report.
    report = json.loads(
        open(os.path.join(workdir, "eval", str(STEP), "validation", "report.json")).read()
    )
    findings = _findings(experiment)
    labels = embedded.labels[:, [FINDING_INDEX[f] for f in findings]]
    targets, valid = evaluation.metrics.binary_targets(labels)
    compared = 0
    for c, finding in enumerate(findings):
        column = np.array([float(r[f"{prompts.slug(finding)}_probability"]) for r in rows[:count]])
        np.testing.assert_allclose(column, result.probabilities[:count, c], rtol=1e-6)
        expected = report["zero_shot"]["auc"][finding]["value"]
        if expected is None:
            continue
        keep = valid[:, c]
        assert skm.roc_auc_score(targets[keep, c], column[keep]) == pytest.approx(
            expected, abs=1e-6
        )
        compared += 1
    assert compared >= 3


def test_yes_no_at_the_reports_thresholds(run, predicted):
    experiment, workdir = run
    result, rows, _, _ = predicted
    report = json.loads(
        open(os.path.join(workdir, "eval", str(STEP), "validation", "report.json")).read()
    )
    thresholds = report["zero_shot"]["threshold"]
    assert report["zero_shot"]["threshold_split"] == "validation"
    decided = 0
    for c, finding in enumerate(_findings(experiment)):
        present = [r[f"{prompts.slug(finding)}_present"] for r in rows if not r["error"]]
        threshold = thresholds[finding]
        if threshold is None:
            assert set(present) == {""}
            continue
        probs = result.probabilities[[not e for e in result.errors], c]
        assert present == ["yes" if p >= threshold else "no" for p in probs]
        decided += 1
    assert decided >= 3


def test_dicom_jpeg_and_unreadable_files(predicted):
    result, rows, names, _ = predicted
    by_name = dict(zip(names, range(len(names)), strict=True))
    png, dicom = by_name["split/000.png"], by_name["first.dcm"]
    jpeg = by_name[next(n for n in names if n.endswith("first.jpg"))]
    np.testing.assert_allclose(result.probabilities[dicom], result.probabilities[png], atol=1e-6)
    # Quality-100 JPEG: a few grey levels off, so close, not equal.
    np.testing.assert_allclose(result.probabilities[jpeg], result.probabilities[png], atol=0.02)
    broken, absent = rows[by_name["broken.png"]], rows[by_name["absent.png"]]
    assert "not a readable image" in broken["error"]
    assert absent["error"] == "file not found"
    for row in (broken, absent):
        assert {v for k, v in row.items() if k not in ("image", "error")} == {""}
    assert np.isnan(result.probabilities[by_name["broken.png"]]).all()


def test_without_report_no_yes_no_columns(run, tmp_path, capsys):
    """A workdir whose checkpoint was never evaluated: probabilities only, and a log line;
    images given as a folder."""
    experiment, workdir = run
    bare = tmp_path / "bare"
    bare.mkdir()
    os.symlink(os.path.join(workdir, "checkpoints"), bare / "checkpoints")
    shutil.copy(os.path.join(workdir, "tokenizer.model"), bare / "tokenizer.model")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 30), dtype=np.uint8)).save(images / f"{i}.png")
    (images / "notes.txt").write_text("not an image")  # Left out: not an image suffix.
    out = tmp_path / "p.csv"
    result = predict.main(
        ["--config", experiment, "--workdir", str(bare), "--images", str(images), "--out", str(out)]
    )
    assert "no evaluation report with thresholds" in capsys.readouterr().out
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert not any(name.endswith("_present") for name in reader.fieldnames)
    assert [os.path.basename(r["image"]) for r in rows] == ["0.png", "1.png", "2.png"]
    probs = np.array([[float(r[f"{prompts.slug(f)}_probability"]) for f in _findings(experiment)]
                      for r in rows])
    np.testing.assert_allclose(probs, result.probabilities, rtol=1e-6)
    assert ((probs > 0) & (probs < 1)).all()


def _hf_folder(config, params, tokenizer_model, folder):
    """What `python -m jaxmedclip.export` writes, less the files only `transformers` reads
    (config.json holds just the model type): weights, tokenizer, preprocessing."""
    from safetensors.numpy import save_file

    from jaxmedclip.convert.tokenizer import save_tokenizer

    os.makedirs(folder)
    weights = export.hf_state_dict(params, config, "clip")
    save_file(weights, os.path.join(folder, "model.safetensors"))
    save_tokenizer(tokenizer_model, config.data.max_text_len, folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "clip"}, f)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump(export.image_processor_config(config, "clip"), f)
    return folder


def test_hf_folder_predicts_as_its_checkpoint(run, predicted, tmp_path):
    from input_pipeline.tokenizer import Tokenizer

    experiment, workdir = run
    result, _, names, images = predicted
    config = config_lib.load_config(experiment)
    assert export.choose_format(config) == "clip"
    params, _ = evaluate.restore_params(evaluate.model_setup(config), workdir, STEP)
    tokenizer_model = os.path.join(workdir, "tokenizer.model")
    folder = _hf_folder(config, params, tokenizer_model, str(tmp_path / "hf"))
    # The folder's tokenizer.json gives our token rows, truncation included.
    texts = ["No pleural effusion.", "the heart is   ENLARGED.", " ".join(["opacity"] * 40)]
    max_len = config.data.max_text_len
    ours = Tokenizer(tokenizer_model, max_len).encode_batch(texts)
    theirs = predict.FolderTokenizer(folder, max_len).encode_batch(texts)
    np.testing.assert_array_equal(theirs, ours)
    assert ours[2, -1] == EOS_ID  # The long text is cut, keeping its EOS.

    out = tmp_path / "hf.csv"
    base = ["--config", experiment, "--hf", folder, "--images", str(images / "split")]
    hf_result = predict.main([*base, "--out", str(out)])
    count = sum(name.startswith("split/") for name in names)
    np.testing.assert_allclose(hf_result.image_emb, result.image_emb[:count], atol=1e-5)
    np.testing.assert_allclose(hf_result.probabilities, result.probabilities[:count], atol=1e-6)
    with open(out, newline="") as f:
        assert not any(k.endswith("_present") for k in csv.DictReader(f).fieldnames)
    with pytest.raises(SystemExit, match="image size, mean, std .* pass the config"):
        predict.main([*base, "--out", str(out), "--config.data.image_mean=0.4"])
    with pytest.raises(SystemExit):  # argparse: --checkpoint belongs to --workdir.
        predict.main([*base, "--out", str(out), "--checkpoint", "2"])


@pytest.mark.slow
def test_exported_folder_with_report_thresholds(run, predicted, tmp_path):
    """The folder `jaxmedclip.export` writes (checked against PyTorch), with the run's
    validation report: the same CSV cells as predicting from the checkpoint."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    experiment, workdir = run
    result, rows, names, images = predicted
    config = config_lib.load_config(experiment)
    params, _ = evaluate.restore_params(evaluate.model_setup(config), workdir, STEP)
    folder = str(tmp_path / "exported")
    export.export(config, params, os.path.join(workdir, "tokenizer.model"), folder)
    report = os.path.join(workdir, "eval", str(STEP), "validation", "report.json")
    out = tmp_path / "hf.csv"
    predict.main(["--config", experiment, "--hf", folder, "--images", str(images / "split"),
                  "--report", report, "--out", str(out)])
    with open(out, newline="") as f:
        hf_rows = list(csv.DictReader(f))
    count = sum(name.startswith("split/") for name in names)
    assert len(hf_rows) == count
    thresholds = json.loads(open(report).read())["zero_shot"]["threshold"]
    decided = 0
    for ours, theirs in zip(rows[:count], hf_rows, strict=True):
        assert os.path.basename(theirs["image"]) == os.path.basename(ours["image"])
        for finding, threshold in thresholds.items():
            key = prompts.slug(finding)
            p = float(ours[f"{key}_probability"])
            assert float(theirs[f"{key}_probability"]) == pytest.approx(p, abs=1e-6)
            # A validation image's own score is its finding's threshold: the exported
            # model's last-bit differences may decide that one either way.
            if threshold is not None and abs(p - threshold) > 1e-5:
                assert theirs[f"{key}_present"] == ours[f"{key}_present"]
                decided += 1
    assert decided > count


def _head(findings, **prompt_overrides):
    config = evaluation.default_config()
    sets = prompts.prompt_sets(findings, config.prompts)
    sets.update(prompt_overrides)
    empty = np.zeros((len(findings), 2), np.float32)
    return evaluation.ZeroShotHead(tuple(findings), sets, empty, empty, 1.0)


def _write_report(path, thresholds, threshold_split="validation", prompt_sets=None):
    zero_shot = {"threshold_split": threshold_split, "threshold": thresholds}
    if prompt_sets is not None:
        zero_shot["prompts"] = {k: s._asdict() for k, s in prompt_sets.items()}
    evaluation.report.write_json(str(path), {"step": STEP, "zero_shot": zero_shot})


def test_report_lookup_and_thresholds(tmp_path):
    findings = ["Edema", "Pneumothorax", "Cardiomegaly"]
    head = _head(findings)
    directory = tmp_path / "eval" / str(STEP)
    assert predict.find_report(str(tmp_path), STEP) is None
    # A report without a threshold split (thresholds chosen on nothing) is no source.
    _write_report(directory / "test" / "report.json", {"Edema": None}, threshold_split=None)
    assert predict.find_report(str(tmp_path), STEP) is None
    _write_report(directory / "validation" / "report.json", {"Edema": 0.3})
    assert predict.find_report(str(tmp_path), STEP).endswith("validation/report.json")
    # `python -m jaxmedclip.evaluate`'s report comes first.
    other = dict(head.prompt_sets, Pneumothorax=prompts.PromptSet(("air.",), ("no air.",)))
    _write_report(
        directory / "report.json",
        {"Edema": 0.25, "Pneumothorax": 0.5, "Cardiomegaly": None},
        prompt_sets=other,
    )
    path = predict.find_report(str(tmp_path), STEP)
    assert path == str(directory / "report.json")
    # Pneumothorax's threshold was chosen for other prompts; Cardiomegaly has none.
    assert predict.thresholds_from_report(path, head) == {
        "Edema": 0.25, "Pneumothorax": None, "Cardiomegaly": None
    }
    with pytest.raises(ValueError, match="no zero-shot thresholds"):
        predict.thresholds_from_report(str(directory / "test" / "report.json"), head)


def test_pixels_preprocess_equals_the_png_path():
    """What predict feeds the model from decoded pixels is what evaluation makes of the
    builders' 16-bit PNG of them."""
    import ml_collections
    import tensorflow as tf

    from input_pipeline import images
    from input_pipeline.stages.pixels import image_preprocess, pixels_preprocess

    data = ml_collections.ConfigDict(dict(image_size=16, image_mean=0.4, image_std=0.3))
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (7, 3), (65, 130)]:
        pixels = rng.integers(0, 65536, shape).astype(np.uint16)
        np.testing.assert_array_equal(
            pixels_preprocess(tf.constant(pixels[..., None]), data).numpy(),
            image_preprocess(tf.constant(images.encode_png(pixels)), data).numpy(),
        )


def test_write_csv_columns(tmp_path):
    findings = ("No Finding", "Edema")
    result = predict.Predictions(
        np.zeros((3, 2), np.float32),
        np.array([[0.2, 0.7], [np.nan, np.nan], [0.6, 0.4]]),
        ["", "file not found", ""],
    )
    out = tmp_path / "p.csv"
    predict.write_csv(str(out), ["a.png", "b.png", "c.dcm"], result, findings,
                      {"No Finding": 0.5, "Edema": None})
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [
        ["image", "no_finding_probability", "no_finding_present", "edema_probability",
         "edema_present", "error"],
        ["a.png", "0.2", "no", "0.7", "", ""],
        ["b.png", "", "", "", "", "file not found"],
        ["c.dcm", "0.6", "yes", "0.4", "", ""],
    ]


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    experiment = _experiment_file(tmp_path)
    base = ["--config", experiment, "--workdir", str(tmp_path / "empty"), "--out", "x.csv"]
    with pytest.raises(SystemExit):
        predict.main(base)
    assert "exactly one of --images PATH... and --manifest CSV" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        predict.main([*base, "--images", "a.png", "--manifest", "m.csv"])
    assert "exactly one of" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="train into --workdir"):
        predict.main([*base, "--images", "a.png"])
    with pytest.raises(SystemExit, match="--manifest .*m.csv does not exist"):
        predict.main([*base, "--manifest", str(tmp_path / "m.csv")])
    manifest = tmp_path / "paths.csv"
    manifest.write_text("path\na.png\n")
    with pytest.raises(SystemExit, match="no 'image' column.*--image_column"):
        predict.main([*base, "--manifest", str(manifest)])
    manifest.write_text("image\n")
    with pytest.raises(SystemExit, match="lists no image"):
        predict.main([*base, "--manifest", str(manifest)])
    (tmp_path / "no_images").mkdir()
    with pytest.raises(SystemExit, match="no_images holds no"):
        predict.main([*base, "--images", str(tmp_path / "no_images")])
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(SystemExit, match="no checkpoint in"):
        predict.main([*base, "--images", "a.png"])
