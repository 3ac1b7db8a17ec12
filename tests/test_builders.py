"""Real-data builders (mimic_cxr, csv_manifest, chexpert) on tiny fixture trees."""

import gzip
import io
import json
import math
import os

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from fixtures_medical import (
    REPORT_VARIANTS,
    gradient,
    label_cells,
    mimic_tree,
    write_csv,
    write_dicom,
    write_raster,
)
from PIL import Image

from input_pipeline import build, builder_common, chexpert, csv_manifest, images, mimic_cxr
from input_pipeline.builder_common import BadDataError
from input_pipeline.findings import CHEXPERT_FINDINGS, FINDING_INDEX


def data_config(tmp_path, name, **fields):
    return ml_collections.ConfigDict({
        "name": name, "data_dir": str(tmp_path / "tfds"), "manual_dir": str(tmp_path / "raw"),
        "source_max_size": 16, "build_workers": 1, "build_max_bad_fraction": 0.01, **fields})


def records(builder, split):
    """Every record of `split`, decoded, text as str, sorted by (study, view)."""
    # Images stay PNG bytes: TFDS decodes 16-bit PNG in numpy only with OpenCV.
    decoders = {"image": tfds.decode.SkipDecoding()}
    if builder.info.file_format.value == "array_record":
        source = builder.as_data_source(split=split, decoders=decoders)
        examples = [source[i] for i in range(len(source))]
    else:
        examples = builder.as_dataset(split=split, shuffle_files=False,
                                      decoders=decoders).as_numpy_iterator()
    out = []
    for example in examples:
        example = dict(example)
        example["image"] = np.asarray(Image.open(io.BytesIO(example["image"])))[..., None]
        out.append({k: (v.decode() if isinstance(v, bytes) else v)
                    for k, v in example.items()})
    return sorted(out, key=lambda e: (e["study_id"], e["view"]))


def build_report(builder):
    with open(builder.build_report_path) as f:
        return json.load(f)["splits"]


# ---------------------------------------------------------------------------- mimic_cxr


def test_mimic_cxr_records(tmp_path):
    facts = mimic_tree(tmp_path / "raw")
    builder = mimic_cxr.build(data_config(tmp_path, "mimic_cxr"))
    info = builder.info.splits
    assert {s: info[s].num_examples for s in ("train", "validation", "test")} == {
        s: sum(i["split"] == t for i in facts["images"].values())
        for s, t in (("train", "train"), ("validation", "validate"), ("test", "test"))}
    train = records(builder, "train")
    by_study = {}
    for example in train:
        by_study.setdefault(example["study_id"], []).append(example)
        image = example["image"]
        assert image.dtype == np.uint16 and image.shape[2] == 1
        assert max(image.shape[:2]) == 16  # Downscaled to source_max_size, aspect kept.
        assert example["has_report"]
        assert example["findings"] or example["impression"]
        assert "___" not in example["report"]
    first = facts["images"]["0000-dcm"]  # MIMIC DICOM, MONOCHROME1, PA of study 1.
    study = by_study[first["study"]]
    assert [e["view"] for e in study] == ["LATERAL", "PA"]
    assert study[0]["findings"] == "Heart size is normal. Lungs are clear."
    assert study[0]["impression"] == "No acute process."
    assert study[0]["patient_id"] == first["patient"] == "p10000000"
    labels = study[0]["labels"]
    assert labels[FINDING_INDEX["No Finding"]] == 1 and np.isnan(labels).sum() == 13
    second = by_study["s50000001"][0]  # Second study of patient 0: 1 / -1 / 0 labels.
    assert second["labels"][FINDING_INDEX["Cardiomegaly"]] == 1
    assert second["labels"][FINDING_INDEX["Edema"]] == -1
    assert second["labels"][FINDING_INDEX["Pneumothorax"]] == 0
    assert second["findings"] == "Small left pleural effusion."
    fallback = [e for e in train if e["study_id"] == "s50000005"][0]  # REPORT_VARIANTS[3]
    assert fallback["findings"] == "PA and lateral views. Mild edema."
    # The MONOCHROME1 DICOM is stored inverted: its decoded record is the image flipped.
    dicom = next(e for e in study if e["view"] == "PA")["image"][..., 0]
    expected = images.resize_max_side(images.load_image(first["path"]), 16)
    np.testing.assert_array_equal(dicom, expected)
    assert dicom[0, 0] > dicom[-1, -1]  # Gradient runs dark -> bright, inverted.
    # Patients never cross splits.
    patients = {s: {e["patient_id"] for e in records(builder, s)}
                for s in ("train", "validation", "test")}
    assert not (patients["train"] & patients["validation"])
    assert not (patients["train"] & patients["test"])
    assert not (patients["validation"] & patients["test"])
    assert build_report(builder)["train"]["bad"] == 0
    # Opening again does not rebuild.
    assert mimic_cxr.build(data_config(tmp_path, "mimic_cxr")).info.splits[
        "train"].num_examples == info["train"].num_examples


def test_mimic_cxr_bad_rows_are_skipped_counted_and_named(tmp_path):
    facts = mimic_tree(tmp_path / "raw", bad=True)
    config = data_config(tmp_path, "mimic_cxr", build_max_bad_fraction=1.0)
    builder = mimic_cxr.build(config)
    written = {s: len(records(builder, s)) for s in ("train", "validation", "test")
               if s in builder.info.splits}
    report = build_report(builder)
    bad_reasons = {}
    for reason in facts["bad"].values():
        bad_reasons[reason] = bad_reasons.get(reason, 0) + 1
    total = {}
    for entry in report.values():
        for reason, count in entry["bad_by_reason"].items():
            total[reason] = total.get(reason, 0) + count
    assert total == bad_reasons
    assert sum(written.values()) == len(facts["images"]) - len(facts["bad"])
    for split, entry in report.items():
        assert entry["rows"] == entry["written"] + entry["bad"] + 0
        assert written.get(split, 0) == entry["written"]
    named = [example["source"] for entry in report.values()
             for rows in entry["bad_examples"].values() for example in rows]
    for dicom_id in facts["bad"]:
        assert any(dicom_id in source for source in named)
    details = " ".join(example["detail"] for entry in report.values()
                       for rows in entry["bad_examples"].values() for example in rows)
    assert "file not found" in details and "not a readable image" in details
    # A missing image names every file tried: the .jpg, .dcm and .png of its dicom_id.
    (missing_id,) = [d for d, reason in facts["bad"].items() if reason == "missing_image"]
    (missing,) = [e for entry in report.values()
                  for e in entry["bad_examples"].get("missing_image", [])]
    study_dir = os.path.dirname(facts["images"][missing_id]["path"])
    assert missing["detail"] == "image not found; tried " + ", ".join(
        os.path.join(study_dir, missing_id + suffix) for suffix in (".jpg", ".dcm", ".png"))


def test_mimic_cxr_too_many_bad_rows_raise_and_publish_nothing(tmp_path):
    mimic_tree(tmp_path / "raw", bad=True)
    config = data_config(tmp_path, "mimic_cxr", build_max_bad_fraction=0.05)
    with pytest.raises(BadDataError,
                       match=r"rows are bad .* > data.build_max_bad_fraction=5.0%"):
        mimic_cxr.build(config)
    builder = mimic_cxr.MimicCxr(config=mimic_cxr.builder_config(config),
                                 data_dir=config.data_dir)
    assert not builder.is_prepared()
    report = build_report(builder)  # There to read, every split, before any decoding.
    assert set(report) == {"train", "validation", "test"}
    assert report["test"] == {
        "stage": "sources read", "rows": 1, "written": 0, "filtered": 0, "bad": 1,
        "bad_fraction": 1.0, "bad_by_reason": {"empty_report": 1},
        "bad_examples": {"empty_report": [{
            "source": report["test"]["bad_examples"]["empty_report"][0]["source"],
            "detail": report["test"]["bad_examples"]["empty_report"][0]["detail"]}]}}
    assert "0700-dcm" in report["test"]["bad_examples"]["empty_report"][0]["source"]


def test_bad_images_over_the_limit_raise_after_decoding(tmp_path):
    root = tmp_path / "raw"
    write_raster(root / "x.png", gradient(6, 6))
    (root / "broken.png").write_bytes(b"\x89PNG broken")  # Bad only once decoded.
    rows = [["x.png", "Clear.", f"s{i}", f"p{i}", "PA", "train"] for i in range(9)]
    rows.append(["broken.png", "Clear.", "s9", "p9", "PA", "train"])
    write_manifest(root, rows)
    with pytest.raises(BadDataError, match="1 of 10 rows are bad"):
        csv_manifest.build(data_config(tmp_path, "csv_manifest", build_max_bad_fraction=0.05))
    builder = csv_manifest.CsvManifest(
        config=csv_manifest.builder_config(data_config(tmp_path, "csv_manifest")),
        data_dir=str(tmp_path / "tfds"))
    assert not builder.is_prepared()
    assert build_report(builder)["train"]["stage"] == "written"


def test_mimic_cxr_view_filter_and_split_file_crossing_patients(tmp_path):
    facts = mimic_tree(tmp_path / "raw")
    frontal = mimic_cxr.build(data_config(tmp_path, "mimic_cxr", views=("PA", "AP")))
    assert frontal.builder_config.name == "s16_PA-AP"
    views = {e["view"] for s in ("train", "validation", "test") for e in records(frontal, s)}
    assert views == {"PA", "AP"}
    lateral = sum(i["view"] == "LATERAL" for i in facts["images"].values())
    assert sum(e["filtered"] for e in build_report(frontal).values()) == lateral

    split = tmp_path / "raw" / "mimic-cxr-2.0.0-split.csv.gz"
    rows = [[d, i["study"][1:], i["patient"][1:],
             "test" if d == "0010-dcm" else i["split"]] for d, i in facts["images"].items()]
    write_csv(split, ["dicom_id", "study_id", "subject_id", "split"], rows, gz=True)
    with pytest.raises(ValueError, match="1 patients are in more than one split .p10000000"):
        mimic_cxr.source_splits(str(tmp_path / "raw"), str(tmp_path / "raw"))


def test_build_needs_manual_dir_only_to_prepare(tmp_path):
    config = data_config(tmp_path, "mimic_cxr")
    config.manual_dir = None
    with pytest.raises(ValueError, match="data.manual_dir is not set"):
        mimic_cxr.build(config)


# -------------------------------------------------------------------------- csv_manifest


def write_manifest(root, rows, header=("image", "report", "study_id", "patient_id", "view",
                                       "split")):
    return write_csv(os.path.join(root, "manifest.csv"), header, rows)


def test_csv_manifest_records_reports_files_lists_and_labels(tmp_path):
    root = tmp_path / "raw"
    write_raster(root / "img" / "a.png", gradient(40, 20))
    write_raster(root / "img" / "b.jpg", gradient(20, 40))
    write_dicom(root / "img" / "c.dcm", gradient(8, 8, dtype=np.uint16))
    (root / "reports").mkdir()
    (root / "reports" / "s2.txt").write_text(REPORT_VARIANTS[1])
    header = ("image", "report", "report_path", "study_id", "patient_id", "view", "split",
              "Cardiomegaly", "No Finding")
    write_manifest(root, [
        ["img/a.png;img/b.jpg", "FINDINGS: Clear.\nIMPRESSION: Normal.", "", "s1", "p1",
         "PA;LATERAL", "train", "0", "1.0"],
        ["img/c.dcm", "", "reports/s2.txt", "s2", "p2", "ap", "valid", "-1", ""],
        ["img/a.png", "Free text only.", "", "s3", "p3", "", "test", "", ""],
    ], header)
    builder = csv_manifest.build(data_config(tmp_path, "csv_manifest"))
    train = records(builder, "train")
    assert [(e["study_id"], e["view"], e["image"].shape) for e in train] == [
        ("s1", "LATERAL", (8, 16, 1)), ("s1", "PA", (16, 8, 1))]
    assert train[0]["findings"] == "Clear." and train[0]["impression"] == "Normal."
    labels = train[0]["labels"]
    assert labels[FINDING_INDEX["Cardiomegaly"]] == 0
    assert labels[FINDING_INDEX["No Finding"]] == 1 and np.isnan(labels).sum() == 12
    (validation,) = records(builder, "validation")
    assert validation["view"] == "AP" and validation["findings"] == (
        "Small left pleural effusion.")
    assert validation["labels"][FINDING_INDEX["Cardiomegaly"]] == -1
    np.testing.assert_array_equal(validation["image"][..., 0],
                                  images.load_image(root / "img" / "c.dcm"))
    (test,) = records(builder, "test")
    assert test["findings"] == "Free text only." and test["view"] == ""


def test_csv_manifest_seeded_patient_split(tmp_path):
    root = tmp_path / "raw"
    write_raster(root / "x.png", gradient(6, 6))
    rows = [["x.png", f"Finding number {i}.", f"s{i}", f"p{i // 2}", "PA"] for i in range(40)]
    write_manifest(root, rows, ("image", "report", "study_id", "patient_id", "view"))
    config = data_config(tmp_path, "csv_manifest", split_fractions=(0.5, 0.25, 0.25),
                         split_seed=3)
    splits = csv_manifest.source_splits(os.path.join(root, "manifest.csv"), str(root),
                                        (0.5, 0.25, 0.25), 3)
    patients = {s: {r.patient_id for r in rows.rows} for s, rows in splits.items()}
    assert {s: len(p) for s, p in patients.items()} == {"train": 10, "validation": 5,
                                                          "test": 5}
    assert sum(len(r.rows) for r in splits.values()) == 40
    assert not (patients["train"] & patients["validation"])
    assert not (patients["train"] & patients["test"])
    again = csv_manifest.source_splits(os.path.join(root, "manifest.csv"), str(root),
                                       (0.5, 0.25, 0.25), 3)
    assert {s: [r.key for r in x.rows] for s, x in again.items()} == {
        s: [r.key for r in x.rows] for s, x in splits.items()}
    other = csv_manifest.source_splits(os.path.join(root, "manifest.csv"), str(root),
                                       (0.5, 0.25, 0.25), 4)
    assert {r.patient_id for r in other["test"].rows} != patients["test"]
    builder = csv_manifest.build(config)
    assert builder.info.splits["validation"].num_examples == 10


def test_csv_manifest_split_column_crossing_patient_is_an_error(tmp_path):
    root = tmp_path / "raw"
    write_raster(root / "x.png", gradient(6, 6))
    write_manifest(root, [["x.png", "Clear.", "s1", "p1", "PA", "train"],
                          ["x.png", "Clear.", "s2", "p1", "PA", "test"]])
    with pytest.raises(ValueError, match="patients are in more than one split"):
        csv_manifest.build(data_config(tmp_path, "csv_manifest"))


def test_csv_manifest_bad_rows(tmp_path):
    root = tmp_path / "raw"
    write_raster(root / "x.png", gradient(6, 6))
    (root / "broken.png").write_bytes(b"\x89PNG broken")
    rows = [["x.png", f"Finding {i}.", f"s{i}", f"p{i}", "PA", "train"] for i in range(6)]
    rows += [["missing.png", "Clear.", "s10", "p10", "PA", "train"],
             ["broken.png", "Clear.", "s11", "p11", "PA", "train"],
             ["x.png", "   ", "s12", "p12", "PA", "train"],
             ["x.png", "INDICATION: cough", "s13", "p13", "PA", "train"]]
    write_manifest(root, rows)
    with pytest.raises(BadDataError, match="4 of 10 rows are bad"):
        csv_manifest.build(data_config(tmp_path, "csv_manifest", build_max_bad_fraction=0.3))
    builder = csv_manifest.build(data_config(tmp_path, "csv_manifest",
                                             build_max_bad_fraction=0.4))
    assert builder.info.splits["train"].num_examples == 6
    entry = build_report(builder)["train"]
    assert entry["bad_by_reason"] == {"empty_report": 2, "missing_image": 1,
                                      "unreadable_image": 1}
    assert entry["bad_examples"]["missing_image"][0]["source"].endswith("manifest.csv line 8")


# ---------------------------------------------------- CSV files and manifests as written


@pytest.mark.parametrize("text, expected", [
    ("a,b\n1,2\n3,4\n", [(2, {"a": "1", "b": "2"}), (3, {"a": "3", "b": "4"})]),
    # Excel's "CSV UTF-8": a byte-order mark and CRLF line ends.
    ("\ufeffa,b\r\n1,2\r\n3,4\r\n", [(2, {"a": "1", "b": "2"}), (3, {"a": "3", "b": "4"})]),
    # A quoted cell over three lines, with a doubled quote; the next row starts at line 5.
    ('a,b\n1,"x\nsaid ""y""\nz"\n3,4\n',
     [(2, {"a": "1", "b": 'x\nsaid "y"\nz'}), (5, {"a": "3", "b": "4"})]),
    ('a,b\r\n1,"x\r\ny"\r\n3,4\r\n', [(2, {"a": "1", "b": "x\r\ny"}), (4, {"a": "3", "b": "4"})]),
    # Spaces around header names; blank lines and rows of blank cells are no rows.
    (" a , b \n\n1,2\n, \n3,4\n", [(3, {"a": "1", "b": "2"}), (5, {"a": "3", "b": "4"})]),
    # A short row's missing cells are ""; a long row keeps its extra cells under None.
    ("a,b\n1\n3,4,5,6\n", [(2, {"a": "1", "b": ""}), (3, {"a": "3", "b": "4", None: ["5", "6"]})]),
], ids=["lf", "bom-crlf", "multi-line", "multi-line-crlf", "blank-rows", "short-long"])
def test_read_csv_rows_and_their_first_lines(tmp_path, text, expected):
    plain = tmp_path / "t.csv"
    plain.write_bytes(text.encode())
    zipped = tmp_path / "t.csv.gz"
    zipped.write_bytes(gzip.compress(text.encode()))
    assert list(builder_common.read_csv(str(plain))) == expected
    assert list(builder_common.read_csv(str(zipped))) == expected


@pytest.mark.parametrize("name, content, match", [
    ("t.csv", b'a,b\n1,2\n3,"open\n4,5\n', r"t\.csv line 3: not valid CSV \(unexpected end"),
    ("t.csv", b'a,b\n1,"x"y\n', r"t\.csv line 2: not valid CSV"),
    ("t.csv", "a,b\n1,2\n3,caf\xe9\n".encode("latin-1"), r"t\.csv line 3: not UTF-8 text"),
    ("t.csv.gz", b"a,b\n1,2\n", r"t\.csv\.gz: not a complete gzip file"),
    ("t.csv.gz", gzip.compress(b"a,b\n" + b"1,2\n" * 100)[:-12],
     r"t\.csv\.gz: not a complete gzip file"),
], ids=["open-quote", "junk-after-quote", "latin-1", "not-gzip", "truncated-gzip"])
def test_read_csv_errors_name_the_file_and_line(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        list(builder_common.read_csv(str(path)))


def test_csv_manifest_rows_as_spreadsheets_write_them(tmp_path):
    root = tmp_path / "raw"
    write_raster(root / "img" / "a.png", gradient(6, 6))
    elsewhere = write_raster(tmp_path / "elsewhere" / "b.png", gradient(6, 6))
    lines = [
        "\ufeffimage,report,study_id,patient_id,view,split,site,Edema",
        'img/a.png,"FINDINGS: Clear lungs,\r\nno effusion.\r\nIMPRESSION: Normal.",s1,p1,PA,'
        "train,A,1",
        f"{elsewhere},No acute process.,s2,p2,AP,train,B,",  # Absolute path.
        "img\\a.png,Clear.,s3,p3,PA,train,C,0",  # Windows separators.
        "img/gone.png;img/a.png,Clear.,s4,p4,PA;LATERAL,train,D,",
        "img/a.png,Clear, unquoted,s5,p5,PA,train,E,",  # One cell too many.
    ]
    manifest = root / "manifest.csv"
    manifest.write_bytes("\r\n".join(lines).encode() + b"\r\n")
    splits = csv_manifest.source_splits(str(manifest), str(root))
    rows = splits["train"].rows
    assert [(r.study_id, r.view, r.image_path, r.source) for r in rows] == [
        ("s1", "PA", str(root / "img" / "a.png"), f"{manifest} line 2"),
        ("s2", "AP", elsewhere, f"{manifest} line 5"),
        ("s3", "PA", str(root / "img" / "a.png"), f"{manifest} line 6"),
        ("s4", "LATERAL", str(root / "img" / "a.png"), f"{manifest} line 7")]
    assert (rows[0].findings, rows[0].impression) == ("Clear lungs, no effusion.", "Normal.")
    assert rows[0].labels[FINDING_INDEX["Edema"]] == 1
    assert rows[2].labels[FINDING_INDEX["Edema"]] == 0
    assert np.isnan(rows[1].labels).all()
    assert [(b.reason, b.source, b.detail) for b in splits["train"].bad] == [
        ("missing_image", f"{manifest} line 7",
         f"image not found; tried {root / 'img' / 'gone.png'}"),
        ("bad_manifest_row", f"{manifest} line 8",
         "1 cells more than the header has columns (a comma in an unquoted cell?)")]


# ------------------------------------------------- one tiny 16-bit build, read two ways


@pytest.fixture(scope="module")
def sixteen_bit_build(tmp_path_factory):
    """A csv_manifest build of three 16-bit PNGs, the manifest saved by a spreadsheet
    (BOM, CRLF, a quoted multi-line report), with one missing image; and the images."""
    tmp_path = tmp_path_factory.mktemp("sixteen_bit")
    root = tmp_path / "raw"
    pixels = {f"{i}.png": gradient(9 + i, 7, dtype=np.uint16, seed=i) for i in range(3)}
    for name, image in pixels.items():
        write_raster(root / name, image)
    lines = ["\ufeffimage,report,study_id,view,split",
             '0.png,"FINDINGS:\r\nHeart size is normal.\r\n\r\nIMPRESSION:\r\nNo acute '
             'process.",s0,PA,train',
             "1.png,Clear.,s1,AP,train", "2.png,Clear.,s2,LATERAL,train",
             "gone.png,Clear.,s3,PA,train"]
    (root / "manifest.csv").write_bytes("\r\n".join(lines).encode() + b"\r\n")
    builder = csv_manifest.build(data_config(tmp_path, "csv_manifest",
                                             build_max_bad_fraction=0.5))
    return builder, pixels, root


def test_random_access_decodes_16_bit_records_like_tf_data(sixteen_bit_build):
    import tensorflow as tf

    builder, pixels, _ = sixteen_bit_build
    decoded = builder.as_data_source("train")  # TFDS's own NumPy decoding, no OpenCV.
    raw = builder.as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})
    assert len(decoded) == 3
    by_study = {}
    for i in range(len(decoded)):
        image = decoded[i]["image"]
        assert image.dtype == np.uint16 and image.shape[2] == 1
        tf_image = tf.io.decode_png(raw[i]["image"], channels=1, dtype=tf.uint16).numpy()
        np.testing.assert_array_equal(image, tf_image)
        by_study[decoded[i]["study_id"].decode()] = image[..., 0]
    for i in range(3):
        np.testing.assert_array_equal(by_study[f"s{i}"], pixels[f"{i}.png"])


def test_manifest_build_from_a_spreadsheet_csv(sixteen_bit_build):
    builder, _, root = sixteen_bit_build
    train = records(builder, "train")
    assert [(e["study_id"], e["view"]) for e in train] == [("s0", "PA"), ("s1", "AP"),
                                                          ("s2", "LATERAL")]
    assert (train[0]["findings"], train[0]["impression"]) == ("Heart size is normal.",
                                                              "No acute process.")
    entry = build_report(builder)["train"]
    assert (entry["rows"], entry["written"], entry["bad_by_reason"]) == (
        4, 3, {"missing_image": 1})
    assert entry["bad_examples"]["missing_image"] == [{
        "source": f"{root / 'manifest.csv'} line 9",  # The multi-line row is lines 2-6.
        "detail": f"image not found; tried {root / 'gone.png'}"}]


# ------------------------------------------------------------------------------ chexpert


def test_chexpert_label_only_records(tmp_path):
    root = tmp_path / "raw" / "CheXpert-v1.0-small"
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_FINDINGS]
    train_rows, valid_rows = [], []
    for p in range(4):
        for view, ap in (("frontal", "AP"), ("lateral", "")):
            rel = f"train/patient{p:05d}/study1/view{1 + (view == 'lateral')}_{view}.jpg"
            write_raster(root / rel, gradient(20, 18, seed=p))
            train_rows.append([f"CheXpert-v1.0-small/{rel}", "Female", "60",
                               view.capitalize(), ap,
                               *label_cells({"Edema": 1.0, "Cardiomegaly": -1.0,
                                             "Pneumothorax": 0.0})])
    rel = "valid/patient64541/study1/view1_frontal.jpg"
    write_raster(root / rel, gradient(20, 18))
    valid_rows.append([f"CheXpert-v1.0-small/{rel}", "Male", "70", "Frontal", "PA",
                       *label_cells({"No Finding": 1.0})])
    write_csv(root / "train.csv", header, train_rows)
    write_csv(root / "valid.csv", header, valid_rows)
    config = data_config(tmp_path, "chexpert")
    config.manual_dir = str(root)
    builder = chexpert.build(config)
    assert set(builder.info.splits) == {"train", "validation"}
    train = records(builder, "train")
    assert len(train) == 8
    first = train[0]
    assert first["study_id"] == "patient00000_study1" and first["patient_id"] == "patient00000"
    assert [e["view"] for e in train[:2]] == ["AP", "LATERAL"]
    assert not first["has_report"]
    assert first["report"] == first["findings"] == first["impression"] == ""
    assert first["labels"][FINDING_INDEX["Edema"]] == 1
    assert first["labels"][FINDING_INDEX["Cardiomegaly"]] == -1
    assert first["labels"][FINDING_INDEX["Pneumothorax"]] == 0
    assert np.isnan(first["labels"]).sum() == 11
    (valid,) = records(builder, "validation")
    assert valid["view"] == "PA" and valid["patient_id"] == "patient64541"


def test_chexpert_gzipped_csvs_and_a_missing_image_names_every_path_tried(tmp_path):
    root = tmp_path / "CheXpert-v1.0-small"
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_FINDINGS]
    present = "train/patient00001/study1/view1_frontal.jpg"
    absent = "train/patient00002/study1/view1_frontal.jpg"
    write_raster(root / present, gradient(6, 6))
    write_csv(root / "train.csv.gz", header, [
        [f"CheXpert-v1.0-small/{rel}", "Female", "50", "Frontal", "PA",
         *label_cells({"Edema": 1.0})] for rel in (present, absent)], gz=True)
    write_csv(root / "valid.csv.gz", header, [], gz=True)
    splits = chexpert.source_splits(str(root))
    assert set(splits) == {"train", "validation"}
    (row,) = splits["train"].rows
    assert row.image_path == str(root / present)
    assert row.labels[FINDING_INDEX["Edema"]] == 1
    (bad,) = splits["train"].bad
    assert bad.reason == "missing_image"
    assert bad.source == f"{root / 'train.csv.gz'} line 3"
    # Tried: manual_dir/Path, manual_dir/Path-without-its-first-part, and its parent/Path
    # (here the second again, named once).
    assert bad.detail == (f"image not found; tried {root / 'CheXpert-v1.0-small' / absent}, "
                          f"{root / absent}")
    os.remove(root / "train.csv.gz")
    with pytest.raises(FileNotFoundError, match="no train.csv or train.csv.gz"):
        chexpert.source_splits(str(root))


# ------------------------------------------------------------------------ shared pieces


def test_parallel_image_workers_match_in_process(tmp_path):
    paths = [write_raster(tmp_path / f"{i}.png", gradient(30, 20, seed=i)) for i in range(40)]
    paths.insert(5, str(tmp_path / "missing.png"))
    jobs = [images.ImageJob(p, 10) for p in paths]
    here = list(builder_common.encoded_images(jobs, workers=1))
    there = list(builder_common.encoded_images(jobs, workers=2))
    assert [r.reason for r in here] == [r.reason for r in there]
    assert here[5].reason == "missing_image"
    for a, b in zip(here, there, strict=True):
        if a.png is not None:
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(a.png))),
                                          np.asarray(Image.open(io.BytesIO(b.png))))


@pytest.mark.parametrize("cell, value", [("1.0", 1.0), ("0", 0.0), ("-1.0", -1.0),
                                         ("", math.nan), (None, math.nan)])
def test_parse_label(cell, value):
    parsed = builder_common.parse_label(cell)
    assert parsed == value or (math.isnan(value) and math.isnan(parsed))


@pytest.mark.parametrize("raw, view", [("PA", "PA"), ("ap", "AP"), ("LL", "LATERAL"),
                                       ("Lateral", "LATERAL"), ("AP AXIAL", ""), ("", "")])
def test_normalize_view(raw, view):
    assert builder_common.normalize_view(raw) == view


def test_build_cli_prepares_a_manifest_config(tmp_path, capsys):
    root = tmp_path / "raw"
    write_raster(root / "x.png", gradient(6, 6))
    write_manifest(root, [["x.png", "Clear.", f"s{i}", f"p{i}", "PA", "train"]
                          for i in range(3)])
    experiment = tmp_path / "exp.py"
    experiment.write_text(
        "import ml_collections\n\n\ndef get_config(arg=None):\n"
        "    config = ml_collections.ConfigDict()\n"
        "    config.data = ml_collections.ConfigDict(dict(\n"
        "        name='csv_manifest', data_dir='', manual_dir='', source_max_size=16,\n"
        "        build_workers=1))\n"
        "    return config\n")
    build.main(["--config", str(experiment), f"--config.data.manual_dir={root}",
                f"--config.data.data_dir={tmp_path / 'tfds'}"])
    out = capsys.readouterr().out
    assert "csv_manifest manifest_" in out and "train: 3 records" in out
    assert "build report: " in out


@pytest.mark.slow
def test_train_runs_on_a_mimic_tree(tmp_path):
    """The reference recipe, shrunk, trains end to end on a MIMIC-CXR-style tree: builder,
    tokenizer, 16-bit images, sentence sampling, augmentation, checkpoint."""
    from jaxmedclip import config_lib, training

    mimic_tree(tmp_path / "raw")
    config = config_lib.config_from_flags(
        "experiments/vit_b16_mimic.py:runlocal",
        [
            "data.name=mimic_cxr",
            f"data.manual_dir={tmp_path / 'raw'}",
            f"data.data_dir={tmp_path / 'tfds'}",
            "data.source_max_size=64",
            "data.vocab_size=128",
            "data.max_bad_fraction=0.5",
            "global_batch_size=8",
            "total_steps=3",
            "log_every=1",
        ],
    )
    training.train(config, str(tmp_path / "work"))
    with open(tmp_path / "work" / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    losses = [line["loss"] for line in lines if "loss" in line]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert os.path.isdir(tmp_path / "work" / "checkpoints" / "3")
