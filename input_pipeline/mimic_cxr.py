"""TFDS builder `mimic_cxr`: MIMIC-CXR(-JPG) images with their reports and CheXpert labels.

Nothing is downloaded: MIMIC-CXR is credentialed (PhysioNet), so the files are placed by
hand under `data.manual_dir`:

    <manual_dir>/
      mimic-cxr-2.0.0-metadata.csv.gz   dicom_id, subject_id, study_id, ViewPosition, ...
      mimic-cxr-2.0.0-split.csv.gz      dicom_id, study_id, subject_id, split
      mimic-cxr-2.0.0-chexpert.csv.gz   subject_id, study_id, 14 CheXpert label columns
      files/p10/p10000032/s50414267/02aa804e-....jpg   (or .dcm, or .png)
      files/p10/p10000032/s50414267.txt                the study's report

(.csv instead of .csv.gz is fine.) The images and CSVs are MIMIC-CXR-JPG 2.0.0 (DICOMs
from MIMIC-CXR work too); the reports come from MIMIC-CXR's `mimic-cxr-reports.zip`,
extracted so `files/` merges, or into another directory named by `data.reports_dir`.

One record per image listed in the split file: `study_id` "s50414267", `patient_id`
"p10000032", `view` PA/AP/LATERAL (LL counts as lateral) or "" from ViewPosition,
FINDINGS/IMPRESSION from `reports.parse_report`, labels from the CheXpert CSV (blank ->
NaN; studies without a row get all-NaN labels). Splits are the official ones
(validate -> validation); a patient found in two splits is an error. `data.views` keeps
only those views (e.g. ("PA", "AP") for frontal only); the others are "filtered", not bad.
Bad rows (missing or unreadable image, missing or empty report) are skipped and counted
(see builder_common); a missing image names the .jpg, .dcm and .png paths tried.

Config fields: data.manual_dir, data.reports_dir (None: manual_dir), data.data_dir,
data.source_max_size (512), data.views (None: all), data.deid ("drop") and
data.deid_pattern (None: the report's de-identification placeholders, see reports.py),
data.build_max_bad_fraction (0.01), data.build_workers (None: all CPUs).
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections
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

_SPLIT_NAMES = {"train": "train", "validate": "validation", "validation": "validation",
                "test": "test"}
_IMAGE_SUFFIXES = (".jpg", ".dcm", ".png")


def _csv_names(kind: str) -> tuple[str, str]:
    return (f"mimic-cxr-2.0.0-{kind}.csv.gz", f"mimic-cxr-2.0.0-{kind}.csv")


@dataclasses.dataclass(eq=False)
class MimicCxrConfig(tfds.core.BuilderConfig):
    """Longest image side kept, the views kept and the placeholder rule (data.deid,
    data.deid_pattern); `name` is derived from them."""

    name: str = ""
    source_max_size: int = builder_common.DEFAULT_SOURCE_MAX_SIZE
    views: tuple[str, ...] = ()
    deid: str = "drop"
    deid_pattern: str | None = None

    @property
    def placeholders(self) -> Placeholders:
        return Placeholders(self.deid, self.deid_pattern)

    def __post_init__(self):
        expected = (f"s{self.source_max_size}_{builder_common.views_name(self.views)}"
                    f"{builder_common.config_name_suffix(self.placeholders)}")
        if not self.name:
            self.name = expected
        elif self.name != expected:
            raise ValueError(f"config name {self.name!r} does not match its fields; "
                             f"leave it empty or use {expected!r}")


class MimicCxr(builder_common.MedicalImageBuilder):
    """MIMIC-CXR chest X-rays with free-text reports and CheXpert labels."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "First release.",
        "1.1.0": "Reports: XXXX and [** **] placeholders too, data.deid; upper-case "
                 "headers mid-line split flattened reports; hyphenated line breaks joined.",
    }
    BUILDER_CONFIGS = [MimicCxrConfig()]
    DESCRIPTION = ("MIMIC-CXR chest X-rays (16-bit PNG), report FINDINGS/IMPRESSION, "
                   "CheXpert labels (1/0/-1/NaN), official splits. One record per image.")
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

    def __init__(self, *, reports_dir: str | None = None, **kwargs):
        self.reports_dir = reports_dir
        super().__init__(**kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # See synthetic_builder: TFDS 4.9.10 cannot find this file by itself.
        return epath.Path(__file__)

    def _source_splits(self, manual_dir: str) -> dict[str, SplitRows]:
        return source_splits(manual_dir, self.reports_dir or manual_dir,
                             self.builder_config.views, self.builder_config.placeholders)


def source_splits(root: str, reports_root: str, views: tuple[str, ...] = (),
                  placeholders: Placeholders = DEFAULT_PLACEHOLDERS
                  ) -> dict[str, SplitRows]:
    """The rows of each split of a MIMIC-CXR tree (see the module docstring)."""
    split_path = builder_common.find_file(root, _csv_names("split"))
    image_split: dict[str, tuple[str, str, str, int]] = {}
    for line, row in read_csv(split_path):
        split = _SPLIT_NAMES.get(row["split"].strip().lower())
        if split is None:
            raise ValueError(f"{split_path} line {line}: split {row['split']!r}; expected "
                             "train, validate or test")
        image_split[row["dicom_id"]] = (split, row["subject_id"], row["study_id"], line)
    builder_common.check_patient_splits(((f"p{s[1]}", s[0]) for s in image_split.values()),
                                        split_path)
    view_of = {row["dicom_id"]: normalize_view(row.get("ViewPosition"))
               for _, row in read_csv(builder_common.find_file(root, _csv_names("metadata")))}
    labels_path = builder_common.find_file(root, _csv_names("chexpert"))
    label_rows = {(row["subject_id"], row["study_id"]): (line, row)
                  for line, row in read_csv(labels_path)}

    splits = {split: SplitRows() for split in builder_common.SPLITS}
    studies: dict[str, tuple | BadRow] = {}
    for dicom_id, (split, subject, study, line) in image_split.items():
        rows = splits[split]
        view = view_of.get(dicom_id, "")
        if views and view not in views:
            rows.filtered += 1
            continue
        study_dir = os.path.join(root, "files", f"p{subject[:2]}", f"p{subject}", f"s{study}")
        source = f"{split_path} line {line} ({dicom_id})"
        if study not in studies:
            studies[study] = _study_fields(reports_root, subject, study,
                                           label_rows.get((subject, study)), labels_path,
                                           placeholders)
        fields = studies[study]
        if isinstance(fields, BadRow):
            rows.bad.append(BadRow(fields.reason, source, fields.detail))
            continue
        candidates = [os.path.join(study_dir, dicom_id + suffix)
                      for suffix in _IMAGE_SUFFIXES]
        image_path = builder_common.first_existing(candidates)
        if image_path is None:
            rows.bad.append(builder_common.missing_image(source, candidates))
            continue
        report, findings, impression, labels = fields
        rows.rows.append(SourceRow(
            key=dicom_id, image_path=image_path, view=view,
            study_id=f"s{study}", patient_id=f"p{subject}", report=report,
            findings=findings, impression=impression, labels=labels, has_report=True,
            source=source))
    return splits


def _study_fields(reports_root: str, subject: str, study: str, label_row, labels_path: str,
                  placeholders: Placeholders):
    """(report, findings, impression, labels) of a study, or the BadRow that skips it."""
    path = os.path.join(reports_root, "files", f"p{subject[:2]}", f"p{subject}",
                        f"s{study}.txt")
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            text = f.read()
    except FileNotFoundError:
        return BadRow(builder_common.MISSING_REPORT, "", f"{path}: file not found")
    fields = builder_common.report_fields(text, placeholders)
    if fields is None:
        return BadRow(builder_common.EMPTY_REPORT, "",
                      f"{path}: no FINDINGS/IMPRESSION text and no fallback paragraph")
    if label_row is None:
        return (*fields, builder_common.blank_labels())
    line, row = label_row
    try:
        return (*fields, labels_from_columns(row))
    except ValueError as e:
        return BadRow(builder_common.BAD_LABEL, "", f"{labels_path} line {line}: {e}")


def builder_config(data_config: ml_collections.ConfigDict) -> MimicCxrConfig:
    """The builder config of `data_config` (data.source_max_size, data.views, data.deid,
    data.deid_pattern)."""
    placeholders = builder_common.placeholders_of(data_config)
    config = MimicCxrConfig(
        source_max_size=int(data_config.get("source_max_size",
                                            builder_common.DEFAULT_SOURCE_MAX_SIZE) or 0),
        views=builder_common.views_filter(data_config), deid=placeholders.mode,
        deid_pattern=placeholders.pattern)
    # TFDS refuses a fresh instance that shares a name with one of BUILDER_CONFIGS.
    return MimicCxr.builder_configs.get(config.name, config)


def build(data_config: ml_collections.ConfigDict) -> MimicCxr:
    """Opens the dataset under `data.data_dir`, preparing it from `data.manual_dir` first
    if absent."""
    return builder_common.build(MimicCxr, builder_config(data_config), data_config,
                                reports_dir=data_config.get("reports_dir", None))
