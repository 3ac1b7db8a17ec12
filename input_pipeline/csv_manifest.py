"""TFDS builder `csv_manifest`: any image-report data described by one CSV file.

    <manual_dir>/manifest.csv      (data.manifest: a name in manual_dir, or a full path)
    <manual_dir>/...               the images and report files the manifest names

The file: UTF-8, with or without a byte-order mark (Excel's "CSV UTF-8"); LF or CRLF
line ends; a cell with commas, quotes or line breaks (a multi-line report) is quoted
("..."; a quote inside doubled: ""), and a quote left open is an error naming the line
where its row starts. Rows of blank cells are skipped.

Columns (header names exact but for surrounding spaces; extra columns are ignored):

  image        image path relative to manual_dir, or absolute, or several joined by ";"
               (one study may also span several rows); JPEG, PNG (8/16-bit) or DICOM;
               Windows "\\" separators work too
  report       the report text, or
  report_path  a report file (UTF-8) relative to manual_dir, or absolute (used where
               `report` is empty); with neither column the data is label-only
               (has_report False)
  study_id     required; views of a study share it
  patient_id   optional; without it every study is its own patient
  view         optional: PA / AP / LATERAL (LAT, LL too), one per image of a ";" list or
               one for all; anything else is "" (unknown)
  split        optional: train / validation (valid, val, validate) / test; a patient in
               two splits is an error. Without the column, patients are split by a seeded
               hash: data.split_fractions (train, validation, test), data.split_seed
  <label>      optional, any of the 14 CheXpert names (findings.CHEXPERT_FINDINGS):
               1 / 0 / -1, blank = not mentioned (NaN); absent columns are blank

Bad rows (missing or unreadable image, missing or empty report, a malformed row, e.g.
more cells than the header has columns) are skipped and counted (see builder_common);
each names its manifest line (the first line of a row spanning several). The config
name holds a hash of the manifest's bytes and the split settings, so an edited manifest
builds anew.

Config fields: data.manual_dir, data.manifest ("manifest.csv"), data.data_dir,
data.split_fractions ((0.8, 0.1, 0.1)), data.split_seed (0), data.source_max_size (512),
data.views (None: all), data.deid ("drop") and data.deid_pattern (None: the reports'
de-identification placeholders, see reports.py), data.build_max_bad_fraction (0.01),
data.build_workers (None: all CPUs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from input_pipeline import builder_common
from input_pipeline.builder_common import (
    BadRow,
    SourceRow,
    SplitRows,
    labels_from_columns,
    normalize_view,
    read_csv,
)
from input_pipeline.reports import DEFAULT_PLACEHOLDERS, Placeholders
from jaxmedclip import config_schema

DEFAULT_MANIFEST = "manifest.csv"
DEFAULT_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
_SPLIT_NAMES = {"train": "train", "validation": "validation", "valid": "validation",
                "validate": "validation", "val": "validation", "test": "test"}
BAD_MANIFEST_ROW = "bad_manifest_row"


@dataclasses.dataclass(eq=False)
class CsvManifestConfig(tfds.core.BuilderConfig):
    """What decides the records; `name` is "<manifest stem>_<hash>_s<max size>", then
    "_<placeholder rule>" unless data.deid is the default (see builder_common)."""

    name: str = ""
    manifest_stem: str = "manifest"
    fingerprint: str = ""
    source_max_size: int = builder_common.DEFAULT_SOURCE_MAX_SIZE
    views: tuple[str, ...] = ()
    split_fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS
    split_seed: int = 0
    deid: str = "drop"
    deid_pattern: str | None = None

    @property
    def placeholders(self) -> Placeholders:
        return Placeholders(self.deid, self.deid_pattern)

    def __post_init__(self):
        expected = (f"{self.manifest_stem}_{self.fingerprint}_s{self.source_max_size}"
                    f"{builder_common.config_name_suffix(self.placeholders)}")
        if not self.name:
            self.name = expected
        elif self.name != expected:
            raise ValueError(f"config name {self.name!r} does not match its fields; "
                             f"leave it empty or use {expected!r}")


class CsvManifest(builder_common.MedicalImageBuilder):
    """Images and reports listed in a CSV manifest."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "First release.",
        "1.1.0": "Reports: XXXX and [** **] placeholders too, data.deid; upper-case "
                 "headers mid-line split flattened reports; hyphenated line breaks joined.",
    }
    DESCRIPTION = ("Images (16-bit PNG) with report FINDINGS/IMPRESSION and optional "
                   "CheXpert labels, listed in a CSV manifest. One record per image.")
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

    def __init__(self, *, manifest_path: str | None = None, **kwargs):
        self.manifest_path = manifest_path
        super().__init__(**kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # See synthetic_builder: TFDS 4.9.10 cannot find this file by itself.
        return epath.Path(__file__)

    def _source_splits(self, manual_dir: str) -> dict[str, SplitRows]:
        config = self.builder_config
        return source_splits(self.manifest_path or os.path.join(manual_dir, DEFAULT_MANIFEST),
                             manual_dir, config.split_fractions, config.split_seed,
                             config.views, config.placeholders)


def source_splits(manifest_path: str, root: str,
                  split_fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS,
                  split_seed: int = 0, views: tuple[str, ...] = (),
                  placeholders: Placeholders = DEFAULT_PLACEHOLDERS) -> dict[str, SplitRows]:
    """The rows of each split of a manifest (see the module docstring)."""
    _check_fractions(split_fractions)
    entries = list(read_csv(manifest_path))
    if not entries:
        raise ValueError(f"{manifest_path} has no rows below its header")
    columns = {name for name in entries[0][1] if name is not None}
    for required in ("image", "study_id"):
        if required not in columns:
            raise ValueError(f"{manifest_path} has no {required!r} column; columns: "
                             f"{sorted(columns)}")
    has_reports = bool(columns & {"report", "report_path"})
    has_split = "split" in columns

    # A row with more cells than columns has its cells shifted: it is a bad row (below)
    # and says nothing reliable about splits.
    aligned = [(line, row) for line, row in entries if not row.get(None)]
    patient_split: dict[str, str] = {}
    if has_split:
        pairs = []
        for line, row in aligned:
            split = _SPLIT_NAMES.get((row["split"] or "").strip().lower())
            if split is None:
                raise ValueError(f"{manifest_path} line {line}: split {row['split']!r}; "
                                 f"expected one of {sorted(_SPLIT_NAMES)}")
            pairs.append((_patient(row), split))
        builder_common.check_patient_splits(pairs, manifest_path)
        patient_split = dict(pairs)
    else:
        patients = sorted({_patient(row) for _, row in aligned if _patient(row)})
        patient_split = seeded_patient_split(patients, split_fractions, split_seed)

    splits = {split: SplitRows() for split in builder_common.SPLITS}
    for line, row in entries:
        source = f"{manifest_path} line {line}"
        patient = _patient(row)
        rows = splits[patient_split.get(patient, "train")]
        try:
            parsed = _parse_row(row, root, has_reports, source, placeholders)
        except ValueError as e:
            rows.bad.append(BadRow(BAD_MANIFEST_ROW, source, str(e)))
            continue
        if isinstance(parsed, BadRow):
            rows.bad.extend([parsed] * max(1, len(_image_cells(row))))
            continue
        fields, labels, image_views = parsed
        for k, (path, view) in enumerate(image_views):
            if views and view not in views:
                rows.filtered += 1
                continue
            candidates = image_candidates(root, path)
            image_path = builder_common.first_existing(candidates)
            if image_path is None:
                rows.bad.append(builder_common.missing_image(source, candidates))
                continue
            rows.rows.append(SourceRow(
                key=f"{line}_{k}", image_path=image_path, view=view,
                study_id=row["study_id"].strip(), patient_id=patient,
                report=fields[0], findings=fields[1], impression=fields[2], labels=labels,
                has_report=has_reports, source=source))
    return splits


def seeded_patient_split(patients: list[str], fractions: tuple[float, float, float],
                         seed: int) -> dict[str, str]:
    """patient -> split: patients ordered by a seeded hash, then cut at the fractions
    (test and validation sizes rounded, the rest train). The same for the same
    (patients, fractions, seed) on every machine."""
    order = sorted(patients, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).digest())
    n_test = round(fractions[2] * len(order))
    n_validation = round(fractions[1] * len(order))
    split = {}
    for i, patient in enumerate(order):
        split[patient] = ("test" if i < n_test else
                          "validation" if i < n_test + n_validation else "train")
    return split


def image_candidates(root: str, path: str) -> list[str]:
    """Where a manifest's image path may be: as written (absolute, or relative to
    `root`), then with Windows "\\" separators read as "/"."""
    candidates = [os.path.join(root, path)]
    if "\\" in path:
        candidates.append(os.path.join(root, *path.replace("\\", "/").split("/")))
    return candidates


def _patient(row: dict[str, str]) -> str:
    return (row.get("patient_id") or "").strip() or (row.get("study_id") or "").strip()


def _image_cells(row: dict[str, str]) -> list[str]:
    return [p.strip() for p in (row.get("image") or "").split(";") if p.strip()]


def _parse_row(row: dict[str, str], root: str, has_reports: bool, source: str,
               placeholders: Placeholders = DEFAULT_PLACEHOLDERS):
    """((report, findings, impression), labels, [(path, view)]) or a BadRow; ValueError
    for a malformed row."""
    if row.get(None):
        raise ValueError(f"{len(row[None])} cells more than the header has columns (a "
                         "comma in an unquoted cell?)")
    paths = _image_cells(row)
    if not paths:
        raise ValueError("empty 'image' cell")
    if not (row.get("study_id") or "").strip():
        raise ValueError("empty 'study_id' cell")
    view_cells = [v.strip() for v in (row.get("view") or "").split(";")]
    if len(view_cells) == 1:
        view_cells = view_cells * len(paths)
    if len(view_cells) != len(paths):
        raise ValueError(f"{len(paths)} images but {len(view_cells)} views")
    labels = labels_from_columns(row)
    image_views = [(p, normalize_view(v)) for p, v in zip(paths, view_cells, strict=True)]
    if not has_reports:
        return ("", "", ""), labels, image_views
    text = row.get("report") or ""
    if not text.strip() and (row.get("report_path") or "").strip():
        path = os.path.join(root, row["report_path"].strip())
        try:
            with open(path, encoding="utf-8-sig", errors="replace") as f:
                text = f.read()
        except FileNotFoundError:
            return BadRow(builder_common.MISSING_REPORT, source, f"{path}: file not found")
    fields = builder_common.report_fields(text, placeholders)
    if fields is None:
        return BadRow(builder_common.EMPTY_REPORT, source,
                      "no FINDINGS/IMPRESSION text and no fallback paragraph")
    return fields, labels, image_views


def _check_fractions(fractions) -> None:
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"data.split_fractions={fractions}: expected three non-negative "
                         "fractions (train, validation, test) summing to 1")


def manifest_path_of(data_config: ml_collections.ConfigDict) -> tuple[str, str]:
    """(manual_dir, manifest path) from data.manual_dir and data.manifest."""
    manual_dir = builder_common.manual_dir_of(data_config, "csv_manifest")
    data_config = config_schema.filled("data", data_config)
    manifest = data_config.manifest or DEFAULT_MANIFEST
    path = manifest if os.path.isabs(manifest) else os.path.join(manual_dir, manifest)
    if not os.path.isfile(path):
        raise ValueError(f"manifest {path} does not exist (data.manifest={manifest!r}, "
                         f"data.manual_dir={manual_dir!r})")
    return manual_dir, path


def builder_config(data_config: ml_collections.ConfigDict) -> CsvManifestConfig:
    """The config of `data_config`; reads the manifest to fingerprint it."""
    data_config = config_schema.filled("data", data_config)
    _, path = manifest_path_of(data_config)
    fractions = tuple(float(f) for f in (data_config.split_fractions
                                         or DEFAULT_SPLIT_FRACTIONS))
    _check_fractions(fractions)
    seed = data_config.split_seed
    views = builder_common.views_filter(data_config)
    placeholders = builder_common.placeholders_of(data_config)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read())
    digest.update(repr((fractions, seed, views)).encode())
    stem = "".join(c if c.isalnum() or c in "-" else "-"
                   for c in os.path.splitext(os.path.basename(path))[0])
    return CsvManifestConfig(
        manifest_stem=stem or "manifest", fingerprint=digest.hexdigest()[:10],
        source_max_size=data_config.source_max_size or builder_common.DEFAULT_SOURCE_MAX_SIZE,
        views=views, split_fractions=fractions, split_seed=seed, deid=placeholders.mode,
        deid_pattern=placeholders.pattern)


def build(data_config: ml_collections.ConfigDict) -> CsvManifest:
    """Opens the dataset under `data.data_dir`, preparing it from the manifest first if
    absent."""
    data_config = config_schema.filled("data", data_config)
    _, path = manifest_path_of(data_config)
    return builder_common.build(CsvManifest, builder_config(data_config), data_config,
                                manifest_path=path)
