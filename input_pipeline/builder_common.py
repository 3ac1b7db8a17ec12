"""What the builders of real data share: the record schema, bad-row accounting with a
build report, parallel image encoding and `build`.

A builder (csv_manifest, mimic_cxr, chexpert) subclasses `MedicalImageBuilder` and only
turns its source layout into `SourceRow`s per split (plus the rows already known to be
bad, e.g. an empty report). This module then encodes the images in worker processes,
skips and counts bad rows, writes the build report and enforces
`data.build_max_bad_fraction` (a build-time limit; the pipeline's `data.max_bad_fraction`
is its own, read-time one).

Build report: `<data_dir>/<name>/<config>/<version>.build_report.json`, beside the
version directory TFDS writes. It is written once the sources are read (stage "sources
read": rows found bad without decoding, e.g. empty reports; a split already over the
limit stops the build here, before any image is decoded) and again after each split is
written (stage "written"), so it is there when a build fails: per split the rows seen,
written and filtered, bad rows per reason, and the first `report_examples` bad rows of
each reason with what was wrong.
"""

from __future__ import annotations

import abc
import csv
import dataclasses
import gzip
import json
import logging
import os
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from input_pipeline import images, synthetic_builder, worker_pool
from input_pipeline.findings import CHEXPERT_FINDINGS, NUM_FINDINGS
from input_pipeline.reports import DEFAULT_PLACEHOLDERS, Placeholders, parse_report
from input_pipeline.tokenizer import tensorflow_on_host
from jaxmedclip import config_schema

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
DEFAULT_SOURCE_MAX_SIZE = 512
DEFAULT_BUILD_MAX_BAD_FRACTION = 0.01  # data.build_max_bad_fraction
DEFAULT_REPORT_EXAMPLES = 20
_CHUNK = 16  # Images per unit of work sent to a worker process.

# Bad-row reasons. Image reasons come from images.encode_job.
MISSING_IMAGE = images.MISSING_IMAGE
UNREADABLE_IMAGE = images.UNREADABLE_IMAGE
MISSING_REPORT = "missing_report"
EMPTY_REPORT = "empty_report"
BAD_LABEL = "bad_label"


class BadDataError(RuntimeError):
    """A split had more bad rows than `max_bad_fraction` allows."""


@dataclasses.dataclass(frozen=True)
class SourceRow:
    """One image to write, with its study's fields. `source` names it in the build report
    (a CSV line, a file), `key` is unique within the split."""

    key: str
    image_path: str
    view: str
    study_id: str
    patient_id: str
    report: str
    findings: str
    impression: str
    labels: np.ndarray
    has_report: bool
    source: str


@dataclasses.dataclass(frozen=True)
class BadRow:
    reason: str
    source: str
    detail: str


@dataclasses.dataclass
class SplitRows:
    """A split's rows to write, the rows already found bad, and how many were filtered out
    on purpose (e.g. a view filter): those are not bad."""

    rows: list[SourceRow] = dataclasses.field(default_factory=list)
    bad: list[BadRow] = dataclasses.field(default_factory=list)
    filtered: int = 0


class Uint16PngImage(tfds.features.Image):
    """`tfds.features.Image` of 16-bit PNGs that random access can decode without OpenCV.

    `as_data_source` decodes in NumPy: with OpenCV where installed, else with Pillow,
    which TFDS permits for uint8 only ("PIL does not handle uint16 images"). Pillow
    reads 16-bit PNG exactly, so this decodes with it: the pixels `as_dataset` and the
    pipeline (`tf.io.decode_png(..., dtype=tf.uint16)`) get. The records are the same
    PNG bytes as a plain uint16 `Image` writes.
    """

    def decode_example_np(self, example: bytes) -> np.ndarray:
        return images.decode_png16(example)[..., None]


def record_features() -> tfds.features.FeaturesDict:
    """The record schema of every real-data builder (synthetic_cxr's plus `has_report`)."""
    return tfds.features.FeaturesDict({
        # 16-bit PNG: precision beyond 8 bits survives until normalisation.
        "image": Uint16PngImage(shape=(None, None, 1), dtype=np.uint16,
                                encoding_format="png"),
        "view": tfds.features.Text(),
        "study_id": tfds.features.Text(),
        "patient_id": tfds.features.Text(),
        "report": tfds.features.Text(),
        "findings": tfds.features.Text(),
        "impression": tfds.features.Text(),
        "labels": tfds.features.Tensor(shape=(NUM_FINDINGS,), dtype=np.float32),
        "has_report": tfds.features.Scalar(dtype=np.bool_),
    })


def normalize_view(value: str | None) -> str:
    """"PA", "AP", "LATERAL" or "" from the spellings sources use (LAT, LL, RL, ...)."""
    view = " ".join(str(value or "").upper().replace("_", " ").split())
    if view in ("PA", "POSTERO ANTERIOR", "POSTEROANTERIOR"):
        return "PA"
    if view in ("AP", "ANTERO POSTERIOR", "ANTEROPOSTERIOR"):
        return "AP"
    if view in ("LATERAL", "LAT", "LL", "RL", "LEFT LATERAL", "RIGHT LATERAL"):
        return "LATERAL"
    return ""


def parse_label(cell: str | None) -> float:
    """A CheXpert label cell: "1"/"1.0" -> 1, "0" -> 0, "-1" -> -1, blank -> NaN."""
    text = str(cell if cell is not None else "").strip()
    if not text or text.lower() == "nan":
        return float("nan")
    value = float(text)
    if value not in (1.0, 0.0, -1.0):
        raise ValueError(f"label {text!r}; expected 1, 0, -1 or blank")
    return value


def labels_from_columns(row: dict[str, str]) -> np.ndarray:
    """float32 [14] in CHEXPERT_FINDINGS order from a CSV row keyed by label names;
    absent columns are blank (NaN). Raises ValueError on a malformed cell."""
    return np.array([parse_label(row.get(name)) for name in CHEXPERT_FINDINGS],
                    dtype=np.float32)


def blank_labels() -> np.ndarray:
    return np.full((NUM_FINDINGS,), np.nan, dtype=np.float32)


def report_fields(text: str | None, placeholders: Placeholders = DEFAULT_PLACEHOLDERS
                  ) -> tuple[str, str, str] | None:
    """(report, findings, impression) of a report text, or None when it has no model
    text (empty, or no sections and an empty fallback). `placeholders`: data.deid."""
    if text is None:
        return None
    sections = parse_report(text, placeholders)
    if sections.is_empty:
        return None
    return sections.report, sections.findings, sections.impression


def check_patient_splits(patient_splits: Iterable[tuple[str, str]], what: str) -> None:
    """Raises if a patient appears in more than one split (names the first few)."""
    seen: dict[str, set[str]] = {}
    for patient, split in patient_splits:
        seen.setdefault(patient, set()).add(split)
    crossing = {p: sorted(s) for p, s in seen.items() if len(s) > 1}
    if crossing:
        shown = ", ".join(f"{p} in {'/'.join(s)}" for p, s in list(crossing.items())[:5])
        raise ValueError(f"{what}: {len(crossing)} patients are in more than one split "
                         f"({shown}); a patient's images must all be in one split")


def encoded_images(jobs: Sequence[images.ImageJob], workers: int
                   ) -> Iterator[images.EncodedImage]:
    """`images.encode_job` of every job, in order, in `workers` processes (1: here)."""
    return worker_pool.map_in_processes("input_pipeline.images:encode_job", jobs, workers,
                                        chunk=_CHUNK)


class BuildReport:
    """Per-split counts and examples of bad rows; written as JSON after every split."""

    def __init__(self, path: str, examples: int):
        self.path = path
        self.examples = examples
        self.splits: dict[str, dict] = {}

    def add_split(self, split: str, seen: int, written: int, filtered: int,
                  bad: Sequence[BadRow], stage: str) -> dict:
        counts = Counter(b.reason for b in bad)
        shown: dict[str, list[dict]] = {}
        for b in bad:
            rows = shown.setdefault(b.reason, [])
            if len(rows) < self.examples:
                rows.append({"source": b.source, "detail": b.detail})
        entry = {"stage": stage, "rows": seen, "written": written, "filtered": filtered,
                 "bad": len(bad), "bad_fraction": len(bad) / seen if seen else 0.0,
                 "bad_by_reason": dict(sorted(counts.items())), "bad_examples": shown}
        self.splits[split] = entry
        return entry

    def write(self) -> None:
        path = epath.Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"splits": self.splits}, indent=2) + "\n")


class MedicalImageBuilder(tfds.core.GeneratorBasedBuilder, abc.ABC):
    """A TFDS builder of image-report records from files in `data.manual_dir`.

    Build-time options that do not change the records (how many bad rows to tolerate,
    how many processes decode) are constructor arguments, not part of the config name.
    """

    def __init__(self, *, max_bad_fraction: float = DEFAULT_BUILD_MAX_BAD_FRACTION,
                 workers: int | None = None, report_examples: int = DEFAULT_REPORT_EXAMPLES,
                 **kwargs):
        if not 0 <= max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction={max_bad_fraction} outside [0, 1]")
        self.max_bad_fraction = max_bad_fraction
        self.workers = workers or os.cpu_count() or 1
        self.report_examples = report_examples
        super().__init__(**kwargs)
        # Fixed now: during a build TFDS points data_dir at a temporary directory.
        self.build_report_path = os.fspath(self.data_path.parent / f"{self.version}"
                                           ".build_report.json")

    @abc.abstractmethod
    def _source_splits(self, manual_dir: str) -> dict[str, SplitRows]:
        """The rows of each split found under `manual_dir`."""

    def _info(self) -> tfds.core.DatasetInfo:
        # Not `dataset_info_from_configs`: it would take this package's README.md.
        return tfds.core.DatasetInfo(builder=self, description=self.DESCRIPTION,
                                     features=record_features(),
                                     homepage="https://github.com/jaxmedclip/jaxmedclip")

    def _split_generators(self, dl_manager):
        sources = self._source_splits(os.fspath(dl_manager.manual_dir))
        report = BuildReport(self.build_report_path, self.report_examples)
        # Rows known bad before any image is decoded (e.g. empty reports) fail a build
        # now rather than after hours of decoding.
        for split in SPLITS:
            if split in sources:
                rows = sources[split]
                report.add_split(split, len(rows.rows) + len(rows.bad), 0, rows.filtered,
                                 rows.bad, stage="sources read")
        report.write()
        for split, entry in report.splits.items():
            self._check(split, entry)
        generators = {}
        for split in SPLITS:
            if split not in sources:
                continue
            if sources[split].rows:
                generators[split] = self._generate_examples(split, sources[split], report)
            else:
                log.warning("%s: split %s has no rows; it is left out", self.name, split)
        if not generators:
            raise ValueError(f"{self.name}: no usable rows under {dl_manager.manual_dir}; "
                             f"see {self.build_report_path}")
        return generators

    def _generate_examples(self, split: str, rows: SplitRows, report: BuildReport):
        bad = list(rows.bad)
        jobs = [images.ImageJob(row.image_path, self.builder_config.source_max_size or None)
                for row in rows.rows]
        written = 0
        for row, encoded in zip(rows.rows, encoded_images(jobs, self.workers), strict=True):
            if encoded.png is None:
                bad.append(BadRow(encoded.reason, row.source, encoded.detail))
                continue
            written += 1
            yield row.key, {
                "image": encoded.png,
                "view": row.view,
                "study_id": row.study_id,
                "patient_id": row.patient_id,
                "report": row.report,
                "findings": row.findings,
                "impression": row.impression,
                "labels": row.labels,
                "has_report": row.has_report,
            }
        seen = len(rows.rows) + len(rows.bad)
        entry = report.add_split(split, seen, written, rows.filtered, bad, stage="written")
        report.write()
        log.info("%s %s: %d of %d rows written, %d filtered, %d bad %s; report: %s",
                 self.name, split, written, seen, rows.filtered, len(bad),
                 entry["bad_by_reason"], self.build_report_path)
        self._check(split, entry)
        if not written:
            raise BadDataError(f"{self.name} {split}: no row could be written; see "
                               f"{self.build_report_path}")

    def _check(self, split: str, entry: dict) -> None:
        if entry["bad_fraction"] > self.max_bad_fraction:
            counts = entry["bad_by_reason"]
            reason = max(counts, key=counts.get)  # The commonest reason's first row.
            first = entry["bad_examples"][reason][0]
            raise BadDataError(
                f"{self.name} {split}: {entry['bad']} of {entry['rows']} rows are bad "
                f"({entry['bad_fraction']:.1%} > data.build_max_bad_fraction="
                f"{self.max_bad_fraction:.1%}): {counts}; e.g. {reason} at "
                f"{first['source']}: {first['detail']}. The first of each reason are "
                f"listed in {self.build_report_path}; fix the data or raise "
                "data.build_max_bad_fraction. Nothing was published for this build.")


def manual_dir_of(data_config: ml_collections.ConfigDict, name: str) -> str:
    """`data.manual_dir`, checked to be an existing directory."""
    manual_dir = config_schema.filled("data", data_config).manual_dir
    if not manual_dir:
        raise ValueError(f"data.manual_dir is not set: point it at the downloaded {name} "
                         "files (see input_pipeline/README.md, 'Bring your own data')")
    if not epath.Path(manual_dir).is_dir():
        raise ValueError(f"data.manual_dir={manual_dir!r} is not a directory")
    return os.fspath(manual_dir)


def build(builder_cls: type[MedicalImageBuilder], config: tfds.core.BuilderConfig,
          data_config: ml_collections.ConfigDict, **builder_kwargs) -> MedicalImageBuilder:
    """Opens `builder_cls(config)` under `data.data_dir`, preparing it from
    `data.manual_dir` first if absent (only then is data.manual_dir needed). Also reads
    data.build_max_bad_fraction and data.build_workers; `builder_kwargs` go to the builder."""
    tensorflow_on_host()  # Writing records runs TensorFlow ops; keep them off the GPUs.
    data_config = config_schema.filled("data", data_config)
    data_dir = data_config.data_dir or synthetic_builder.default_data_dir()
    max_bad = data_config.build_max_bad_fraction
    options = dict(
        max_bad_fraction=DEFAULT_BUILD_MAX_BAD_FRACTION if max_bad is None else max_bad,
        workers=data_config.build_workers, **builder_kwargs)
    builder = builder_cls(config=config, data_dir=data_dir, **options)
    if builder.is_prepared():
        return builder
    download_config = tfds.download.DownloadConfig(
        manual_dir=manual_dir_of(data_config, builder_cls.name), try_download_gcs=False)
    try:
        builder.download_and_prepare(
            download_config=download_config,
            # ArrayRecord, like synthetic_cxr: the pipeline reads records by index.
            file_format=synthetic_builder.FILE_FORMAT)
    except OSError:
        # Another process built the same config at the same time: open the winner's.
        builder = builder_cls(config=config, data_dir=data_dir, **options)
        if not builder.is_prepared():
            raise
    return builder


def read_csv(path: str) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) of a CSV file with a header, plain or gzipped (.gz).

    UTF-8 with or without a byte-order mark; LF or CRLF line ends; quoted cells may span
    lines (the line number is the row's first line). Header names are stripped of
    surrounding spaces. A short row's missing cells are ""; a long row's extra cells are
    under the key None (as csv.DictReader does). Rows of blank cells are skipped. A file
    that is not UTF-8, not valid CSV (e.g. a quote never closed) or a broken .gz is a
    ValueError naming the file and the line.
    """
    opener = gzip.open if path.endswith(".gz") else open
    line = 0
    try:
        with opener(path, "rt", newline="", encoding="utf-8-sig") as f:
            # strict: a quote left open must not swallow the rest of the file silently.
            reader = csv.reader(f, strict=True)
            header = None
            while True:
                line = reader.line_num + 1
                cells = next(reader, None)
                if cells is None:
                    return
                if not any(cell.strip() for cell in cells):
                    continue
                if header is None:
                    header = [name.strip() for name in cells]
                    continue
                row = dict(zip(header, cells, strict=False))
                for name in header[len(cells):]:
                    row[name] = ""
                if len(cells) > len(header):
                    row[None] = cells[len(header):]
                yield line, row
    except UnicodeDecodeError:
        raise ValueError(f"{path} line {_first_non_utf8_line(path)}: not UTF-8 text; save "
                         "the file as UTF-8 (in Excel: 'CSV UTF-8')") from None
    except csv.Error as e:
        raise ValueError(f"{path} line {line}: not valid CSV ({e}); check the quotes of "
                         "the row that starts there") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: not a complete gzip file ({e})") from None


def _first_non_utf8_line(path: str) -> int:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return 0


def find_file(directory: str, names: Sequence[str]) -> str:
    """The first of `names` that exists in `directory`; an error naming them all if none."""
    for name in names:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"none of {', '.join(names)} in {directory}")


def first_existing(candidates: Sequence[str]) -> str | None:
    """The first of `candidates` that is a file, or None."""
    return next((path for path in candidates if os.path.isfile(path)), None)


def missing_image(source: str, candidates: Sequence[str]) -> BadRow:
    """The bad row of an image found at none of `candidates`, naming every one tried."""
    tried = list(dict.fromkeys(candidates))
    return BadRow(MISSING_IMAGE, source, "image not found; tried " + ", ".join(tried))


def views_filter(data_config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """`data.views` checked and canonical: () keeps every view."""
    views = tuple(config_schema.filled("data", data_config).views or ())
    for view in views:
        if view not in ("PA", "AP", "LATERAL", ""):
            raise ValueError(f"data.views contains {view!r}; expected PA, AP, LATERAL or "
                             "'' (unknown view)")
    return tuple(sorted(set(views), key=("PA", "AP", "LATERAL", "").index))


def placeholders_of(data_config: ml_collections.ConfigDict) -> Placeholders:
    """`data.deid` and `data.deid_pattern`, checked: what the builder makes of
    de-identification placeholders in reports (`reports.Placeholders`)."""
    data_config = config_schema.filled("data", data_config)
    return Placeholders(data_config.deid, data_config.deid_pattern)


def config_name_suffix(placeholders: Placeholders) -> str:
    """"" for the default placeholder rule, else "_<its name>": part of a builder config's
    name, so records cleaned by different rules never share a directory."""
    return f"_{placeholders.name}" if placeholders.name else ""


def views_name(views: Sequence[str]) -> str:
    return "-".join(v or "unknown" for v in views) if views else "all"
