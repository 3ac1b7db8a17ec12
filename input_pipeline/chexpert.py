"""TFDS builder `chexpert`: CheXpert images with labels only (no reports).

Nothing is downloaded (CheXpert needs a Stanford AIMI data-use agreement); point
`data.manual_dir` at the extracted folder that holds the CSVs:

    <manual_dir>/                    e.g. .../CheXpert-v1.0-small
      train.csv                      -> split "train"
      valid.csv                      -> split "validation"
      test.csv                       -> split "test" (optional, e.g. the test labels)
      (each may be gzipped instead: train.csv.gz, ...; the plain .csv is read if both are)
      train/patient00001/study1/view1_frontal.jpg
      ...

CSV columns: Path, Sex, Age, Frontal/Lateral, AP/PA, then the 14 CheXpert labels
(1 / 0 / -1 / blank). `Path` is looked up relative to manual_dir, then with its first
component dropped (the CSVs say "CheXpert-v1.0-small/train/..."), then relative to
manual_dir's parent; an image in none of them is a missing image naming all three. Sex
and Age are not recorded.

Records: `has_report` False and report/findings/impression "" (later stages may turn the
labels into text); `patient_id` "patient00001" and `study_id` "patient00001_study1" from
the path; `view` LATERAL for lateral images, else the AP/PA column (PA, AP, or "" when
blank or unusual); `labels` as in the CSV (blank -> NaN). A patient in two CSVs is an
error. `data.views` keeps only those views. Bad rows (missing or unreadable image, a
path without patientNNNNN/studyN, a malformed label) are skipped and counted.

Config fields: data.manual_dir, data.data_dir, data.source_max_size (512), data.views
(None: all), data.build_max_bad_fraction (0.01), data.build_workers (None: all
CPUs).
"""

from __future__ import annotations

import dataclasses
import os
import re

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

SPLIT_FILES = {"train": "train.csv", "validation": "valid.csv", "test": "test.csv"}
_CSV_SUFFIXES = ("", ".gz")  # train.csv first, then train.csv.gz.
BAD_PATH = "bad_path"
_PATIENT_STUDY = re.compile(r"(patient\d+)/(study\d+)/")


@dataclasses.dataclass(eq=False)
class ChexpertConfig(tfds.core.BuilderConfig):
    """Longest image side kept and the views kept; `name` is derived from them."""

    name: str = ""
    source_max_size: int = builder_common.DEFAULT_SOURCE_MAX_SIZE
    views: tuple[str, ...] = ()

    def __post_init__(self):
        expected = f"s{self.source_max_size}_{builder_common.views_name(self.views)}"
        if not self.name:
            self.name = expected
        elif self.name != expected:
            raise ValueError(f"config name {self.name!r} does not match its fields; "
                             f"leave it empty or use {expected!r}")


class Chexpert(builder_common.MedicalImageBuilder):
    """CheXpert chest X-rays with CheXpert labels; label-only (no report text)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [ChexpertConfig()]
    DESCRIPTION = ("CheXpert chest X-rays (16-bit PNG) with CheXpert labels (1/0/-1/NaN); "
                   "no reports (has_report False). One record per image.")
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # See synthetic_builder: TFDS 4.9.10 cannot find this file by itself.
        return epath.Path(__file__)

    def _source_splits(self, manual_dir: str) -> dict[str, SplitRows]:
        return source_splits(manual_dir, self.builder_config.views)


def source_splits(root: str, views: tuple[str, ...] = ()) -> dict[str, SplitRows]:
    """The rows of each split of a CheXpert folder (see the module docstring)."""
    if _split_csv(root, "train") is None:
        raise FileNotFoundError(f"{root} has no train.csv or train.csv.gz: data.manual_dir "
                                "must be the folder with CheXpert's train.csv and valid.csv")
    splits: dict[str, SplitRows] = {}
    pairs = []
    for split in SPLIT_FILES:
        csv_path = _split_csv(root, split)
        if csv_path is None:
            continue
        rows = splits[split] = SplitRows()
        for line, row in read_csv(csv_path):
            source = f"{csv_path} line {line}"
            rel = (row.get("Path") or "").strip()
            match = _PATIENT_STUDY.search(rel.replace("\\", "/"))
            if not match:
                rows.bad.append(BadRow(BAD_PATH, source, f"{rel!r} has no patientN/studyN"))
                continue
            patient, study = match.groups()
            pairs.append((patient, split))
            view = _view(row, rel)
            if views and view not in views:
                rows.filtered += 1
                continue
            try:
                labels = labels_from_columns(row)
            except ValueError as e:
                rows.bad.append(BadRow(builder_common.BAD_LABEL, source, str(e)))
                continue
            candidates = _image_candidates(root, rel)
            image_path = builder_common.first_existing(candidates)
            if image_path is None:
                rows.bad.append(builder_common.missing_image(source, candidates))
                continue
            rows.rows.append(SourceRow(
                key=rel, image_path=image_path, view=view,
                study_id=f"{patient}_{study}", patient_id=patient, report="", findings="",
                impression="", labels=labels, has_report=False, source=source))
    builder_common.check_patient_splits(pairs, f"CheXpert CSVs in {root}")
    return splits


def _view(row: dict[str, str], rel: str) -> str:
    frontal_lateral = (row.get("Frontal/Lateral") or "").strip().lower()
    if not frontal_lateral:  # E.g. the test labels CSV: only the file name tells.
        frontal_lateral = "lateral" if "_lateral" in rel.lower() else "frontal"
    if frontal_lateral == "lateral":
        return "LATERAL"
    view = normalize_view(row.get("AP/PA"))
    return view if view in ("PA", "AP") else ""


def _split_csv(root: str, split: str) -> str | None:
    """The CSV of `split` in `root` (plain or .gz), or None."""
    return builder_common.first_existing(
        [os.path.join(root, SPLIT_FILES[split] + suffix) for suffix in _CSV_SUFFIXES])


def _image_candidates(root: str, rel: str) -> list[str]:
    """Where `rel` may be, in order: root/rel, root/rel-without-first-part, parent/rel."""
    parts = rel.replace("\\", "/").split("/")
    return [os.path.join(root, *parts), os.path.join(root, *parts[1:]),
            os.path.join(os.path.dirname(os.path.abspath(root)), *parts)]


def builder_config(data_config: ml_collections.ConfigDict) -> ChexpertConfig:
    """The builder config of `data_config` (data.source_max_size, data.views)."""
    config = ChexpertConfig(
        source_max_size=int(data_config.get("source_max_size",
                                            builder_common.DEFAULT_SOURCE_MAX_SIZE) or 0),
        views=builder_common.views_filter(data_config))
    # TFDS refuses a fresh instance that shares a name with one of BUILDER_CONFIGS.
    return Chexpert.builder_configs.get(config.name, config)


def build(data_config: ml_collections.ConfigDict) -> Chexpert:
    """Opens the dataset under `data.data_dir`, preparing it from `data.manual_dir` first
    if absent."""
    return builder_common.build(Chexpert, builder_config(data_config), data_config)
