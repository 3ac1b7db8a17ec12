"""TFDS builder `synthetic_cxr`: the synthetic generator written as image-report records.

One record per image: a two-view study gives two records that share `study_id`,
`patient_id`, the report and the labels. Splits hold the configured numbers of studies,
and the records are the same bytes for the same config on every machine. Nothing is
downloaded; building never needs the network.

    builder = build(config.data)  # Prepares it the first time, then just opens it.
    builder.as_data_source(split="train")[i]  # ArrayRecord: any record by index.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from input_pipeline import synthetic_cxr, worker_pool
from input_pipeline.findings import NUM_FINDINGS
from input_pipeline.tokenizer import tensorflow_on_host

DATA_DIR_ENV = "JAXMEDCLIP_DATA_DIR"
# The pipeline reads records by index (exact resume, process-independent order).
FILE_FORMAT = "array_record"
_STUDIES_PER_TASK = 32
_MAX_WORKERS = 8


def default_data_dir() -> str:
    """$JAXMEDCLIP_DATA_DIR, else ~/.cache/jaxmedclip/tfds."""
    return os.environ.get(DATA_DIR_ENV) or os.path.expanduser("~/.cache/jaxmedclip/tfds")


def config_name(num_train: int, num_validation: int, num_test: int, source_image_size: int,
                seed: int) -> str:
    """E.g. "n4096-512-1024_s128_seed0": each size lands in its own directory."""
    return f"n{num_train}-{num_validation}-{num_test}_s{source_image_size}_seed{seed}"


@dataclasses.dataclass(eq=False)
class SyntheticCxrConfig(tfds.core.BuilderConfig):
    """Numbers of studies per split, image size and seed; `name` is derived from them."""

    name: str = ""
    num_train: int = 4096
    num_validation: int = 512
    num_test: int = 1024
    source_image_size: int = 128
    seed: int = 0

    def __post_init__(self):
        expected = config_name(self.num_train, self.num_validation, self.num_test,
                               self.source_image_size, self.seed)
        if not self.name:
            self.name = expected
        elif self.name != expected:
            raise ValueError(f"config name {self.name!r} does not match its fields; "
                             f"leave it empty or use {expected!r}")
        for split, count in self.split_sizes.items():
            if not 0 <= count <= synthetic_cxr.MAX_STUDIES_PER_SPLIT:
                raise ValueError(f"num_{split}={count} outside "
                                 f"[0, {synthetic_cxr.MAX_STUDIES_PER_SPLIT}]")
        if self.source_image_size < 16:
            raise ValueError(f"source_image_size={self.source_image_size} is below 16")

    @property
    def split_sizes(self) -> dict[str, int]:
        return {"train": self.num_train, "validation": self.num_validation,
                "test": self.num_test}


class SyntheticCxr(tfds.core.GeneratorBasedBuilder):
    """Synthetic chest X-ray images with MIMIC-style reports and CheXpert-style labels."""

    VERSION = tfds.core.Version("1.5.0")
    RELEASE_NOTES = {
        "1.0.0": "First release.",
        "1.1.0": "Records written as ArrayRecord, for reading by index.",
        "1.2.0": "Lung opacity drawn as faint wide haze, consolidation dense and sharply "
                 "marginated; thicker tubes and lines; larger pneumothorax rims.",
        "1.3.0": "Subtle findings (severity < 0.25) are always reported with hedging "
                 "(uncertain, -1); lung opacity a little denser.",
        "1.4.0": "Aerated lung drawn less dark, so that a pneumothorax's lucent rim stands "
                 "out; pneumothorax a little more common (12% -> 15% of pathology draws); "
                 "lung opacity denser; consolidations larger.",
        "1.5.0": "`regions`: where each localised finding (pleural effusion, pneumothorax, "
                 "consolidation, lung opacity) lies in the image, for grounding evaluation. "
                 "Images, reports and labels are the same bytes as 1.4.0's.",
    }
    BUILDER_CONFIGS = [SyntheticCxrConfig()]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS 4.9.10 looks this file up through `importlib_resources`, a package it
        # does not declare (tensorflow/datasets#11212); the answer is simply this file.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        # Not `dataset_info_from_configs`: it would take this package's README.md.
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Synthetic chest X-rays (PA/AP/lateral) with drawn findings, MIMIC-style "
                "FINDINGS/IMPRESSION reports written from them, and CheXpert-style labels "
                "(1 positive, 0 negative, -1 uncertain, NaN not mentioned), and a map of "
                "where each localised finding lies. One record per image."),
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 1), dtype=np.uint8,
                                             encoding_format="png"),
                "view": tfds.features.Text(),
                "study_id": tfds.features.Text(),
                "patient_id": tfds.features.Text(),
                "report": tfds.features.Text(),
                "findings": tfds.features.Text(),
                "impression": tfds.features.Text(),
                "labels": tfds.features.Tensor(shape=(NUM_FINDINGS,), dtype=np.float32),
                # Bit k of a pixel: LOCALISED_FINDINGS[k] lies there (the image's size).
                "regions": tfds.features.Image(shape=(None, None, 1), dtype=np.uint8,
                                               encoding_format="png"),
            }),
            homepage="https://github.com/jaxmedclip/jaxmedclip",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Everything is generated.
        return {split: self._generate_examples(split, count)
                for split, count in self.builder_config.split_sizes.items()}

    def _generate_examples(self, split: str, num_studies: int):
        config = self.builder_config
        ranges = [synthetic_cxr.StudyRange(config.seed, split, start,
                                           min(start + _STUDIES_PER_TASK, num_studies),
                                           config.source_image_size)
                  for start in range(0, num_studies, _STUDIES_PER_TASK)]
        workers = min(os.cpu_count() or 1, _MAX_WORKERS)
        for records in worker_pool.map_in_processes("input_pipeline.synthetic_cxr:study_records",
                                                    ranges, workers):
            yield from records


def builder_config(data_config: ml_collections.ConfigDict) -> SyntheticCxrConfig:
    """The builder config named by `data_config.synthetic`."""
    synthetic = data_config.synthetic
    config = SyntheticCxrConfig(
        num_train=synthetic.num_train, num_validation=synthetic.num_validation,
        num_test=synthetic.num_test, source_image_size=synthetic.source_image_size,
        seed=synthetic.seed)
    # TFDS refuses a fresh instance that shares a name with one of BUILDER_CONFIGS.
    return SyntheticCxr.builder_configs.get(config.name, config)


def build(data_config: ml_collections.ConfigDict) -> SyntheticCxr:
    """Opens the dataset under `data_config.data_dir`, generating it first if absent."""
    tensorflow_on_host()  # Writing records runs TensorFlow ops; keep them off the GPUs.
    data_dir = data_config.data_dir or default_data_dir()
    config = builder_config(data_config)
    builder = SyntheticCxr(config=config, data_dir=data_dir)
    if not builder.is_prepared():
        try:
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(try_download_gcs=False),
                file_format=FILE_FORMAT)
        except OSError:
            # Several processes may build the same config at once (e.g. every process of
            # a multi-process job on one host). They write the same bytes; the first to
            # finish wins and the others' final rename fails. Open the winner's.
            builder = SyntheticCxr(config=config, data_dir=data_dir)
            if not builder.is_prepared():
                raise
    return builder
