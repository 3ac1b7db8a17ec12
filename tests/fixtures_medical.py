"""Tiny medical-data fixtures written into a test's tmp_path: DICOM files, rasters, a
MIMIC-CXR-style tree, a CSV manifest and a CheXpert-style CSV."""

from __future__ import annotations

import csv
import gzip
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from input_pipeline.findings import CHEXPERT_FINDINGS


def write_dicom(path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2",
                bits_stored: int | None = None, slope: float | None = None,
                intercept: float | None = None, window: tuple[float, float] | None = None,
                voi_function: str | None = None, voi_lut: Sequence[int] | None = None,
                voi_lut_bits: int = 16, view: str | None = None, rle: bool = False,
                transfer_syntax: str | None = None) -> str:
    """A single-frame grayscale DICOM file with exactly these stored values and tags.

    `pixels` dtype picks BitsAllocated and PixelRepresentation (uint8/uint16/int16);
    `transfer_syntax` only relabels the (uncompressed) bytes, to fake an undecodable file.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        ExplicitVRLittleEndian,
        RLELossless,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    pixels = np.asarray(pixels)
    bits = pixels.dtype.itemsize * 8
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits
    ds.BitsStored = bits_stored or bits
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept or 0
        ds.RescaleType = "US"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_function is not None:
        ds.VOILUTFunction = voi_function
    if voi_lut is not None:
        item = Dataset()
        item.LUTDescriptor = [len(voi_lut), 0, voi_lut_bits]
        item.add_new(0x00283006, "US", list(voi_lut))  # LUTData, 16-bit entries.
        ds.VOILUTSequence = [item]
    if view is not None:
        ds.ViewPosition = view
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    if rle:
        ds.compress(RLELossless, pixels)
    if transfer_syntax is not None:
        from pydicom.uid import UID

        ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
        # An encapsulated-looking payload: decoders fail on it, parsers accept it.
        from pydicom.encaps import encapsulate

        ds.PixelData = encapsulate([b"\xff\xd8 not really compressed \xff\xd9"])
        ds["PixelData"].VR = "OB"
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return os.fspath(path)


def write_raster(path, pixels: np.ndarray, **save_kwargs) -> str:
    """uint8 or uint16 [H, W] (or uint8 [H, W, 3]) saved by Pillow; format from the name."""
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    Image.fromarray(np.asarray(pixels)).save(path, **save_kwargs)
    return os.fspath(path)


def gradient(height: int = 24, width: int = 20, dtype=np.uint8, seed: int = 0) -> np.ndarray:
    """A smooth image with a little noise, full range of `dtype`."""
    rng = np.random.default_rng(seed)
    top = np.iinfo(dtype).max
    y, x = np.mgrid[0:height, 0:width]
    ramp = (x / max(width - 1, 1) + y / max(height - 1, 1)) / 2
    noisy = ramp * 0.9 + 0.1 * rng.random((height, width))
    return np.round(np.clip(noisy, 0, 1) * top).astype(dtype)


def write_csv(path, header: Sequence[str], rows: Sequence[Sequence], gz: bool = False) -> str:
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    opener = gzip.open if gz else open
    with opener(path, "wt", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return os.fspath(path)


def label_cells(values: dict[str, float]) -> list[str]:
    """CheXpert-ordered CSV cells: "" for a blank label."""
    return ["" if name not in values else f"{values[name]:.1f}" for name in CHEXPERT_FINDINGS]


REPORT_VARIANTS = (
    " FINAL REPORT\n INDICATION: ___M with cough\n\n FINDINGS:\n\n Heart size is normal. "
    "Lungs\n are clear.\n\n IMPRESSION:\n\n No acute process.\n",
    "EXAMINATION: CHEST\n\nFindings: Small left pleural effusion.\nImpression: Effusion.",
    "COMPARISON: ___\n\nIMPRESSION: Stable cardiomegaly.",
    "INDICATION: fever\n\nCOMPARISON: None.\n\nPA and lateral views. Mild edema.",
)

MIMIC_LABEL_COLUMNS = tuple(sorted(CHEXPERT_FINDINGS))  # The official CSVs are alphabetical.


def mimic_tree(root, *, bad: bool = False) -> dict:
    """A MIMIC-CXR-JPG-style tree of 8 patients / 10 studies / 14 images under `root`.

    Images are JPEG, one DICOM per patient p1000000[0-1] (one MONOCHROME1), views PA/AP/
    LATERAL. With `bad`: one missing image, one corrupt JPEG, one empty report, one study
    whose report file is missing. Returns facts the tests check against.
    """
    root = os.fspath(root)
    metadata, split_rows, label_rows = [], [], []
    images: dict[str, dict] = {}
    study_number = 50000000
    splits = ["train"] * 5 + ["validate"] * 2 + ["test"]
    for p in range(8):
        subject = 10000000 + p
        for s in range(2 if p < 2 else 1):
            study = study_number
            study_number += 1
            study_dir = os.path.join(root, "files", f"p{str(subject)[:2]}", f"p{subject}",
                                     f"s{study}")
            report = REPORT_VARIANTS[(p + s) % len(REPORT_VARIANTS)]
            views = ("PA", "LATERAL") if (p + s) % 3 == 0 else ("AP",)
            for v, view in enumerate(views):
                dicom_id = f"{p:02d}{s}{v}-dcm"
                pixels = gradient(30 + 4 * v, 26, seed=p * 10 + s * 3 + v)
                if p < 2 and s == 0 and v == 0:
                    path = write_dicom(os.path.join(study_dir, dicom_id + ".dcm"),
                                       pixels.astype(np.uint16) * 16, bits_stored=12,
                                       photometric="MONOCHROME1" if p == 0 else "MONOCHROME2")
                else:
                    path = write_raster(os.path.join(study_dir, dicom_id + ".jpg"), pixels,
                                        quality=95)
                metadata.append([dicom_id, subject, study, view, *pixels.shape])
                split_rows.append([dicom_id, study, subject, splits[p]])
                images[dicom_id] = {"path": path, "view": view, "study": f"s{study}",
                                    "patient": f"p{subject}", "split": splits[p]}
            with open(os.path.join(os.path.dirname(study_dir), f"s{study}.txt"), "w") as f:
                f.write(report)
            labels = {"Cardiomegaly": 1.0, "Edema": -1.0, "Pneumothorax": 0.0} if s else {
                "No Finding": 1.0}
            label_rows.append([subject, study,
                               *[labels.get(n, "") for n in MIMIC_LABEL_COLUMNS]])
    write_csv(os.path.join(root, "mimic-cxr-2.0.0-metadata.csv.gz"),
              ["dicom_id", "subject_id", "study_id", "ViewPosition", "Rows", "Columns"],
              metadata, gz=True)
    write_csv(os.path.join(root, "mimic-cxr-2.0.0-split.csv.gz"),
              ["dicom_id", "study_id", "subject_id", "split"], split_rows, gz=True)
    write_csv(os.path.join(root, "mimic-cxr-2.0.0-chexpert.csv.gz"),
              ["subject_id", "study_id", *MIMIC_LABEL_COLUMNS], label_rows, gz=True)
    bad_rows = {}
    if bad:
        ids = list(images)
        os.remove(images[ids[2]]["path"])
        bad_rows[ids[2]] = "missing_image"
        corrupt = next(i for i in ids[3:] if images[i]["path"].endswith(".jpg"))
        with open(images[corrupt]["path"], "wb") as f:
            f.write(b"\xff\xd8\xff\xe0 truncated")
        bad_rows[corrupt] = "unreadable_image"
        empty_study = images[ids[-1]]
        with open(_report_path(root, empty_study), "w") as f:
            f.write("INDICATION: ___\n\nCOMPARISON: None.\n")
        for dicom_id, image in images.items():
            if image["study"] == empty_study["study"]:
                bad_rows[dicom_id] = "empty_report"
        gone = images[ids[-2]]
        if gone["study"] != empty_study["study"]:
            os.remove(_report_path(root, gone))
            for dicom_id, image in images.items():
                if image["study"] == gone["study"]:
                    bad_rows[dicom_id] = "missing_report"
    return {"images": images, "bad": bad_rows}


def _report_path(root: str, image: dict) -> str:
    patient = image["patient"]
    return os.path.join(root, "files", patient[:3], patient, image["study"] + ".txt")
