"""`python -m input_pipeline.preview`: the grid of examples as the model sees them."""

import os

import numpy as np
import pytest
from fixtures_medical import label_cells, mimic_tree, write_csv, write_raster
from PIL import Image, ImageFont

from input_pipeline import preview, tokenizer
from input_pipeline.findings import CHEXPERT_FINDINGS, FINDING_INDEX
from jaxmedclip import config_lib
from jaxmedclip.vocabulary import BOS_ID, EOS_ID, PAD_ID

SYNTHETIC = [  # tiny_synthetic.py:runlocal, shrunk to build in about a second.
    "--config.data.synthetic.num_train=8", "--config.data.synthetic.num_validation=2",
    "--config.data.synthetic.num_test=2", "--config.data.synthetic.source_image_size=64",
    "--config.data.image_size=32", "--config.data.max_text_len=12",
    "--config.global_batch_size=8"]


def data_experiment(tmp_path, name: str, **data) -> str:
    """An experiment file that holds only `seed`, `global_batch_size` and `data`."""
    fields = dict(name=name, data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "raw"),
                  source_max_size=16, build_workers=1, image_size=16, max_text_len=16,
                  vocab_size=64, tokenizer_type="bpe")
    fields.update(data)
    path = tmp_path / f"{name}_experiment.py"
    path.write_text("import ml_collections\n\n\ndef get_config(arg=None):\n"
                    "    return ml_collections.ConfigDict(dict(seed=0, global_batch_size=8, "
                    f"data={fields!r}))\n")
    return str(path)


# ------------------------------------------------------------------------- pure helpers


def test_label_summary_groups_findings_by_value_and_leaves_blanks_out():
    labels = np.zeros(len(CHEXPERT_FINDINGS), np.float32)
    present = np.zeros(len(CHEXPERT_FINDINGS), bool)
    for name, value in (("Cardiomegaly", 1), ("Edema", -1), ("Pneumothorax", 0),
                        ("Pleural Effusion", 1)):
        labels[FINDING_INDEX[name]], present[FINDING_INDEX[name]] = value, True
    summary = preview.label_summary(labels, present)
    assert summary == preview.LabelSummary(("Cardiomegaly", "Pleural Effusion"), ("Edema",),
                                           ("Pneumothorax",))
    assert summary.lines() == ["+ Cardiomegaly, Pleural Effusion", "? Edema", "- Pneumothorax"]
    # A blank label reads 0 in the batch, but is not a negative finding.
    assert preview.label_summary(np.zeros(14), np.zeros(14, bool)).lines() == ["no labels"]


def test_display_maps_the_normalised_image_back_to_its_source_intensities():
    mean, std = 0.5, 0.25
    source = np.array([[0, 257 * 12, 3000], [32896, 60000, 65535]], np.uint16)
    # What pixels.py makes of a 16-bit PNG: [0, 1] by 65535, then normalised (float32).
    normalised = ((source.astype(np.float32) / 65535 - mean) / std)[..., None]
    shown = preview.display_intensities(normalised, mean, std)
    assert shown.dtype == np.uint8 and shown.shape == (2, 3)
    np.testing.assert_array_equal(shown, [[0, 12, 12], [128, 233, 255]])
    # Photometric augmentation can leave [0, 1]: clipped for display, and said so.
    jittered = np.array([[-2.5, 0.0], [1.0, 2.4]], np.float32)  # -0.125, 0.5, 0.75, 1.1
    np.testing.assert_array_equal(preview.display_intensities(jittered, mean, std),
                                  [[0, 128], [191, 255]])
    assert preview.intensity_note(jittered, mean, std) == (
        "intensity -0.12 to 1.10, 50% clipped")
    assert preview.intensity_note(normalised, mean, std) == "intensity 0.00 to 1.00"


def test_truncation_marker_counts_the_pieces_cut():
    kept = np.array([BOS_ID, 11, 12, 13, 14, EOS_ID])  # Full: max_text_len 6 reached.
    assert preview.is_full(kept) and preview.num_pieces(kept) == 4
    uncut = np.array([BOS_ID, 11, 12, 13, 14, 15, 16, EOS_ID, PAD_ID, PAD_ID])
    assert preview.truncation_marker(kept, uncut) == "[+2 tokens cut at max_text_len=6]"
    # Exactly max_text_len - 2 pieces: the row is full but nothing was cut.
    exact = np.array([BOS_ID, 11, 12, 13, 14, EOS_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID])
    assert preview.truncation_marker(kept, exact) == ""
    assert preview.truncation_marker(kept, None) == ""
    # The uncut read full as well: the count is a lower bound.
    assert preview.truncation_marker(kept, np.array([BOS_ID, *range(20, 28), EOS_ID])) == (
        "[+4 or more tokens cut at max_text_len=6]")
    short = np.array([BOS_ID, 11, EOS_ID, PAD_ID])
    assert not preview.is_full(short) and preview.num_pieces(short) == 1


def test_local_batch_reads_the_first_rows_of_the_global_batch():
    assert preview.local_batch(64, 16) == (4, 16)
    assert preview.local_batch(100, 16) == (5, 20)  # The smallest divisor >= 16.
    assert preview.local_batch(8, 20) == (1, 8)  # More than a batch: whole batches.


def test_wrap_keeps_lines_within_the_width():
    font = ImageFont.load_default(size=preview.FONT_SIZE)
    text = "moderate bilateral pleural effusions " * 3 + "x" * 80
    lines = preview.wrap(text, font, 120)
    assert " ".join(lines).replace(" ", "") == text.replace(" ", "")
    assert all(font.getlength(line) <= 120 for line in lines)
    assert lines[0] == "moderate bilateral"


def test_tile_size_grows_by_one_image_per_view():
    one, two = preview.tile_size(32, 1), preview.tile_size(32, 2)
    assert two[0] - one[0] == 32 + preview.GAP and two[1] == one[1]
    assert one[1] == 2 * preview.PAD + preview.MIN_TEXT_LINES * preview.LINE_HEIGHT
    assert preview.tile_size(400, 1)[1] == 400 + 2 * preview.PAD


# ------------------------------------------------------------------------- on datasets


def shown_by(monkeypatch) -> list:
    """Collects what `preview.preview` returns while `main` runs (one pipeline read)."""
    seen = []
    real = preview.preview

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(preview, "preview", spy)
    return seen


def test_synthetic_training_rows_with_their_cut_texts(tmp_path, capsys, monkeypatch):
    out = tmp_path / "grid.png"
    spec = "experiments/tiny_synthetic.py:runlocal"
    overrides = [*SYNTHETIC, f"--config.data.data_dir={tmp_path / 'tfds'}"]
    seen = shown_by(monkeypatch)
    preview.main(["--config", spec, *overrides, "--n", "4", "--cols", "2",
                  "--image-px", "48", "--out", str(out)])
    width, height = preview.tile_size(48, 1)
    with Image.open(out) as grid:
        assert grid.format == "PNG" and grid.size == (2 * width, 2 * height)
    printed = capsys.readouterr().out
    assert "4 examples of synthetic_cxr train as training reads them" in printed

    (shown,) = seen
    from input_pipeline import pipeline

    config = config_lib.config_from_flags(spec, [o[len("--config."):] for o in overrides])
    builder, tok = pipeline.prepare(config.data)
    source = builder.as_data_source(split="train")
    reports = [tokenizer.normalize_text(f"{r['findings'].decode()} {r['impression'].decode()}")
               for r in (source[i] for i in range(len(source)))]
    long = tokenizer.Tokenizer(tok.model_path, preview.FULL_TEXT_LEN)
    pieces = [preview.num_pieces(row) for row in long.encode_normalized(reports)]
    for tile in shown.tiles:
        assert tile.labels and len(tile.images) == 1 and tile.images[0].shape == (32, 32)
        ((text, marker),) = tile.texts
        # The text is the start of a record's report; the marker counts what was cut.
        cuts = {f"[+{p - 10} tokens cut at max_text_len=12]" if p > 10 else ""
                for report, p in zip(reports, pieces, strict=True) if report.startswith(text)}
        assert marker in cuts, (text, marker, cuts)
    assert any(marker for tile in shown.tiles for _, marker in tile.texts)
    assert "texts cut at max_text_len=12" in shown.summary

    with pytest.raises(SystemExit, match=r"^error: split 'tset' not in \['test', 'train'"):
        preview.main(["--config", spec, *overrides, "--split", "tset", "--out", str(out)])


def test_csv_manifest_16_bit_images_and_views(tmp_path, capsys, monkeypatch):
    root = tmp_path / "raw"
    dim = np.full((16, 16), 3000, np.uint16)  # 12-bit values in a 16-bit PNG: dim.
    bright = np.full((16, 8), 60000, np.uint16)
    write_raster(root / "s1_pa.png", dim)
    write_raster(root / "s1_lat.png", dim)
    write_raster(root / "s2.png", bright)
    write_raster(root / "s3.png", bright)
    header = ("image", "report", "study_id", "patient_id", "view", "split", "Cardiomegaly",
              "Edema", "No Finding")
    write_csv(root / "manifest.csv", header, [
        ["s1_pa.png;s1_lat.png", "FINDINGS: Heart is enlarged.\nIMPRESSION: Cardiomegaly.",
         "s1", "p1", "PA;LATERAL", "train", "1", "-1", ""],
        ["s2.png", "IMPRESSION: No acute process.", "s2", "p2", "AP", "train", "0", "", "1"],
        ["s3.png", "Lungs are clear.", "s3", "p3", "PA", "train", "", "", "1"],
        ["s1_pa.png;s1_lat.png", "FINDINGS: Clear lungs.", "s4", "p4", "PA;LATERAL",
         "validation", "", "0", "1"],
    ])
    experiment = data_experiment(tmp_path, "csv_manifest", max_text_len=64)
    out = tmp_path / "grid.png"
    seen = shown_by(monkeypatch)
    preview.main(["--config", experiment, "--n", "4", "--cols", "4", "--image-px", "32",
                  "--out", str(out)])
    width, height = preview.tile_size(32, 1)
    with Image.open(out) as grid:
        assert grid.size == (4 * width, height)
        centers = sorted(grid.getpixel((i * width + preview.PAD + 16, preview.PAD + 16))[0]
                         for i in range(4))
    # 3000 / 65535 and 60000 / 65535 of full scale: the dim images stay dim.
    assert centers == [12, 12, 233, 233]
    assert "4 examples of csv_manifest train" in capsys.readouterr().out

    (train,) = seen
    by_text = {tile.texts[0][0]: tile for tile in train.tiles}
    assert all(tile.texts[0][1] == "" for tile in train.tiles)  # Nothing cut at 64.
    assert set(by_text) == {"heart is enlarged. cardiomegaly.", "no acute process.",
                            "lungs are clear."}
    assert by_text["heart is enlarged. cardiomegaly."].labels == ["+ Cardiomegaly", "? Edema"]
    assert by_text["no acute process."].labels == ["+ No Finding", "- Cardiomegaly"]
    config = config_lib.config_from_flags(experiment, required=False)
    validation = preview.preview(config, split="validation", n=4, train=False, step=0)
    assert [tile.header.split()[1] for tile in validation.tiles] == ["LATERAL", "PA"]
    assert validation.tiles[0].labels == ["+ No Finding", "- Edema"]


@pytest.mark.slow
def test_chexpert_reads_its_labels_as_prompts(tmp_path):
    root = tmp_path / "raw"
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_FINDINGS]
    rows = []
    for p in range(4):
        path = f"train/patient{p:05d}/study1/view1_frontal.jpg"
        write_raster(root / path, np.full((20, 18), 40 * p + 20, np.uint8))
        rows.append([path, "F", "60", "Frontal", "AP",
                     *label_cells({"Edema": 1.0, "Cardiomegaly": -1.0, "Pneumothorax": 0.0})])
    write_csv(root / "train.csv", header, rows)
    write_raster(root / "valid/patient00009/study1/view1_frontal.jpg", np.zeros((8, 8), np.uint8))
    write_csv(root / "valid.csv", header, [["valid/patient00009/study1/view1_frontal.jpg", "M",
                                            "70", "Frontal", "PA",
                                            *label_cells({"No Finding": 1.0})]])
    experiment = data_experiment(tmp_path, "chexpert", max_text_len=128)
    out = str(tmp_path / "grid.png")
    from input_pipeline import pipeline

    config = config_lib.config_from_flags(experiment, required=False)
    # No report to train a tokenizer on: it is trained on the labels as prompts.
    path = tokenizer.tokenizer_path(config.data, pipeline.build_dataset(config.data))
    with pytest.raises(SystemExit, match=r"^error: all 4 rows read were skipped .* "
                                         r"--config.data.decoupled=\{\}"):
        preview.main(["--config", experiment, "--n", "4", "--out", out])
    assert os.path.exists(path)
    preview.main(["--config", experiment, "--n", "4", "--config.data.decoupled={}",
                  "--out", out])
    config = config_lib.config_from_flags(experiment, ["data.decoupled={}"], required=False)
    shown = preview.preview(config, split="train", n=4, train=True, step=0)
    for tile in shown.tiles:
        assert tile.notes[0] == "text: the labels as a prompt"
        assert tile.labels == ["+ Edema", "? Cardiomegaly", "- Pneumothorax"]
        text, marker = tile.texts[0]
        assert "pneumothorax" in text and "\u2047" not in text and not marker


@pytest.mark.slow
def test_mimic_cxr_and_a_multiview_recipe(tmp_path):
    mimic_tree(tmp_path / "raw")
    experiment = data_experiment(tmp_path, "mimic_cxr", text="sentences", multiview=True,
                                 augment={"crop_scale": (0.7, 1.0), "rotation_degrees": 5.0})
    out = tmp_path / "grid.png"
    preview.main(["--config", experiment, "--n", "3", "--cols", "3", "--image-px", "32",
                  "--out", str(out)])
    width, height = preview.tile_size(32, 2)
    with Image.open(out) as grid:
        assert grid.size == (3 * width, height)
    config = config_lib.config_from_flags(experiment, required=False)
    shown = preview.preview(config, split="train", n=3, train=True, step=0)
    for tile in shown.tiles:
        assert len(tile.images) == 2 and len(tile.texts) == 2
    evaluation = preview.preview(config, split="validation", n=8, train=False, step=0)
    assert {tile.header.split()[1] for tile in evaluation.tiles} <= {"PA", "AP", "LATERAL"}
    assert all(len(tile.images) == 1 for tile in evaluation.tiles)
    # Evaluation reads whole reports: the longer ones are cut at max_text_len=16.
    assert any(marker.endswith("tokens cut at max_text_len=16]")
               for tile in evaluation.tiles for _, marker in tile.texts)
