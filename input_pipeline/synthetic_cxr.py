"""Seeded generator of synthetic chest X-ray studies: images, MIMIC-style report, labels.

numpy (Pillow only to write PNGs, reports.py to split the sections), no TensorFlow. A
study is a function of (seed, split, index) only, so any split can be regenerated,
sharded or parallelised without coordination.

Images are drawn from an attenuation map (bright = dense) in anatomy coordinates
x, y in [-1, 1] (x grows to the image right = the patient's left on frontal views;
y grows downwards), posed by a small random shift/rotation/scale, then windowed with a
random exposure, contrast and gamma, and given Gaussian noise. Findings are drawn large
enough to survive a 64x64 downsample; their size varies, and the report's size words
follow the drawn size.

Each image comes with a region map (`Study.regions`): bit k of a pixel is set where
`LOCALISED_FINDINGS[k]` is drawn there (its visible part, above half strength; the
heart and mediastinum drawn over it are left out), for grounding evaluation. Computing
it draws no random numbers: the images are the same with and without it.

Reports are written from the drawn findings. Every sentence carries the labels it
implies, and a study's labels merge them CheXpert-style (positive beats uncertain beats
negative): 1.0 asserted, -1.0 uncertain ("possible", "cannot be excluded", ...), 0.0
explicitly negated, NaN not mentioned. "No Finding" is 1.0 for normal studies and NaN
otherwise. About 40% of studies are normal and share a handful of near-identical
reports, on purpose: they are the false negatives a contrastive batch must live with.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import numpy as np

from input_pipeline.findings import CHEXPERT_FINDINGS, FINDING_INDEX
from input_pipeline.images import encode_png
from input_pipeline.reports import parse_report
from jaxmedclip.vocabulary import LOCALISED_FINDINGS

SPLIT_CODES: dict[str, int] = {"train": 0, "validation": 1, "test": 2}
MAX_STUDIES_PER_SPLIT = 3_000_000
NORMAL_FRACTION = 0.4
TWO_VIEW_FRACTION = 0.25

LOBES: dict[str, tuple[float, float]] = {  # Frontal-view centre (x, y) of each region.
    "right upper lobe": (-0.36, -0.35),
    "right middle lobe": (-0.27, 0.12),
    "right lower lobe": (-0.42, 0.28),
    "left upper lobe": (0.38, -0.33),
    "lingula": (0.36, 0.08),
    "left lower lobe": (0.47, 0.3),
}
DEVICES = ("endotracheal_tube", "right_ij_catheter", "left_subclavian_catheter",
           "enteric_tube", "pacemaker")

_PATHOLOGIES = ("Cardiomegaly", "Pleural Effusion", "Pneumothorax", "airspace", "Edema")
_PATHOLOGY_WEIGHTS = np.array([0.2, 0.25, 0.15, 0.24, 0.16])
_DEVICE_WEIGHTS = np.array([0.32, 0.18, 0.12, 0.22, 0.16])


@dataclasses.dataclass(frozen=True)
class Abnormality:
    """One drawn finding. `severity` in [0, 1] sets its drawn size and its size words."""

    label: str  # A CHEXPERT_FINDINGS name.
    severity: float
    side: str = ""  # "left" | "right" | "bilateral" | "" (patient's side).
    lobe: str = ""  # A LOBES key, for Consolidation / Lung Opacity.
    devices: tuple[str, ...] = ()  # DEVICES entries, for Support Devices.
    uncertain: bool = False  # Reported with hedging words; label -1.


@dataclasses.dataclass(frozen=True)
class Study:
    """One synthetic study: 1-2 views, one report, one label vector."""

    study_id: str
    patient_id: str
    views: tuple[str, ...]  # "PA" | "AP" | "LATERAL"
    images: tuple[np.ndarray, ...]  # uint8 [S, S] per view.
    report: str  # Full report with section headers.
    labels: np.ndarray  # float32 [14] over CHEXPERT_FINDINGS: 1 / 0 / -1 / NaN.
    abnormalities: tuple[Abnormality, ...]  # Empty for normal studies.
    cardiothoracic_ratio: float  # Drawn heart width / thoracic width on the PA view.
    # uint8 [S, S] per view: bit k set where LOCALISED_FINDINGS[k] lies (`region_masks`).
    regions: tuple[np.ndarray, ...] = ()

    @property
    def is_normal(self) -> bool:
        return not self.abnormalities


def region_masks(regions: np.ndarray) -> dict[str, np.ndarray]:
    """A region map (uint8 [H, W], bit k = LOCALISED_FINDINGS[k]) -> finding -> bool
    [H, W], for the findings whose region is not empty."""
    masks = {name: (regions >> k) & 1 == 1 for k, name in enumerate(LOCALISED_FINDINGS)}
    return {name: mask for name, mask in masks.items() if mask.any()}


class ReportSections(NamedTuple):
    findings: str
    impression: str


def report_sections(report: str) -> ReportSections:
    """The FINDINGS and IMPRESSION text of a report (headers removed, one line each, ""
    when missing), as every builder parses reports (`reports.parse_report`)."""
    sections = parse_report(report)
    return ReportSections(sections.findings, sections.impression)


def generate_study(seed: int, split: str, index: int, source_image_size: int = 128) -> Study:
    """Study `index` of `split`, a pure function of (seed, split, index).

    The report and labels do not depend on `source_image_size`.
    """
    if split not in SPLIT_CODES:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_CODES)}")
    if not 0 <= index < MAX_STUDIES_PER_SPLIT:
        raise ValueError(f"study index {index} outside [0, {MAX_STUDIES_PER_SPLIT})")
    code = SPLIT_CODES[split]
    rng = np.random.default_rng([seed, code, index])
    # Bijections of (split, index) onto 7 digits: ids never collide within a seed.
    serial = code * MAX_STUDIES_PER_SPLIT + index
    study_id = f"s5{(serial * 7_654_321 + seed * 1_234_567 + 13) % 10_000_000:07d}"
    patient_id = f"p1{(serial * 3_141_593 + seed * 2_718_281 + 7) % 10_000_000:07d}"

    abnormalities = () if rng.random() < NORMAL_FRACTION else _sample_abnormalities(rng)
    has_devices = any(a.label == "Support Devices" for a in abnormalities)
    if rng.random() < TWO_VIEW_FRACTION:
        views = ("PA", "LATERAL")
    else:  # Portable AP films are the usual ones for patients with lines and tubes.
        views = ("AP",) if rng.random() < (0.7 if has_devices else 0.25) else ("PA",)
    anatomy = _sample_anatomy(rng, abnormalities)
    report, labels = _write_report(rng, abnormalities, views)
    rendered = [
        _render(np.random.default_rng([seed, code, index, 1 + i]), view, anatomy,
                abnormalities, source_image_size)
        for i, view in enumerate(views)
    ]
    return Study(study_id, patient_id, views, tuple(image for image, _ in rendered), report,
                 labels, abnormalities, anatomy.cardiothoracic_ratio,
                 tuple(regions for _, regions in rendered))


class StudyRange(NamedTuple):
    seed: int
    split: str
    start: int
    stop: int
    source_image_size: int


def study_records(studies: StudyRange) -> list[tuple[str, dict]]:
    """(key, record) per image of studies [start, stop): the `synthetic_cxr` TFDS rows.

    Images are PNG bytes. One StudyRange is the unit of work of a parallel build.
    """
    records = []
    for index in range(studies.start, studies.stop):
        study = generate_study(studies.seed, studies.split, index, studies.source_image_size)
        findings, impression = report_sections(study.report)
        for view_index, (view, image, regions) in enumerate(
                zip(study.views, study.images, study.regions, strict=True)):
            records.append((f"{study.study_id}_{view_index}", {
                # Noisy images barely compress: the fastest level loses little.
                "image": encode_png(image, compress_level=1),
                "regions": encode_png(regions),
                "view": view,
                "study_id": study.study_id,
                "patient_id": study.patient_id,
                "report": study.report,
                "findings": findings,
                "impression": impression,
                "labels": study.labels,
            }))
    return records


# ----------------------------------------------------------------------------- sampling


def _sample_abnormalities(rng: np.random.Generator) -> tuple[Abnormality, ...]:
    count = int(rng.choice(3, p=[0.5, 0.33, 0.17])) + 1
    with_devices = count >= 2 and rng.random() < 0.45  # Always beside a pathology.
    kinds = rng.choice(len(_PATHOLOGIES), size=count - with_devices, replace=False,
                       p=_PATHOLOGY_WEIGHTS)
    result = []
    for kind in sorted(kinds):
        name = _PATHOLOGIES[kind]
        severity = float(rng.random())
        uncertain = severity < 0.25  # Subtle findings are reported with hedging.
        side = lobe = ""
        if name == "Pleural Effusion":
            side = str(rng.choice(["right", "left", "bilateral"], p=[0.4, 0.3, 0.3]))
        elif name == "Pneumothorax":
            side = str(rng.choice(["right", "left"]))
        elif name == "airspace":
            name = "Consolidation" if rng.random() < 0.5 else "Lung Opacity"
            lobe = str(rng.choice(list(LOBES)))
            side = lobe.split()[0] if lobe != "lingula" else "left"
        result.append(Abnormality(name, severity, side, lobe, uncertain=uncertain))
    if with_devices:
        num = 1 + int(rng.random() < 0.35)
        picked = rng.choice(len(DEVICES), size=num, replace=False, p=_DEVICE_WEIGHTS)
        devices = tuple(DEVICES[i] for i in sorted(picked))
        result.append(Abnormality("Support Devices", 1.0, devices=devices))
    return tuple(result)


@dataclasses.dataclass(frozen=True)
class _Anatomy:
    cardiothoracic_ratio: float
    lung_cx: float  # |x| of each lung's centre.
    lung_half_width: float
    dome_right: float  # y of the top of each hemidiaphragm.
    dome_left: float
    body_half_width: float
    gastric_bubble: bool


def _sample_anatomy(rng: np.random.Generator, abnormalities) -> _Anatomy:
    ratio = rng.uniform(0.38, 0.47)
    for a in abnormalities:
        if a.label == "Cardiomegaly":
            ratio = 0.5 + 0.2 * a.severity
    dome_right = rng.uniform(0.3, 0.4)
    return _Anatomy(
        cardiothoracic_ratio=float(ratio),
        lung_cx=rng.uniform(0.37, 0.4),
        lung_half_width=rng.uniform(0.28, 0.31),
        dome_right=dome_right,
        dome_left=dome_right + rng.uniform(0.02, 0.08),
        body_half_width=rng.uniform(0.84, 0.92),
        gastric_bubble=bool(rng.random() < 0.6),
    )


# ------------------------------------------------------------------------------ drawing


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    centres = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    y, x = np.meshgrid(centres, centres, indexing="ij")
    return x, y


def _inside(signed_distance, edge: float):
    """Soft indicator of signed_distance < 0 with a linear edge of width `edge`."""
    return np.clip(0.5 - signed_distance / edge, 0.0, 1.0)


def _ellipse(x, y, cx, cy, ax, ay, boxy: bool = False):
    """Approximate signed distance to an ellipse, or with `boxy` to a rounded box
    (|dx|^4 + |dy|^4 = 1 in units of the half-axes)."""
    dx2, dy2 = ((x - cx) / ax) ** 2, ((y - cy) / ay) ** 2
    radius = np.sqrt(np.sqrt(dx2 * dx2 + dy2 * dy2)) if boxy else np.sqrt(dx2 + dy2)
    return (radius - 1) * min(ax, ay)


def _polyline(x, y, points, width: float):
    """Soft mask of a polyline of `width` through `points`."""
    distance = np.full(x.shape, np.inf, dtype=np.float32)
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:], strict=True):
        vx, vy = x1 - x0, y1 - y0
        t = np.clip(((x - x0) * vx + (y - y0) * vy) / (vx * vx + vy * vy), 0, 1)
        distance = np.minimum(distance, np.hypot(x - x0 - t * vx, y - y0 - t * vy))
    return _inside(distance - width / 2, 0.012)


@functools.lru_cache(maxsize=32)
def _interpolation_matrix(size: int, cells: int) -> np.ndarray:
    """[size, cells + 1] linear interpolation weights from a coarse grid to pixels."""
    position = np.linspace(0, cells, size)
    low = np.minimum(position.astype(np.int64), cells - 1)
    weights = np.zeros((size, cells + 1), dtype=np.float32)
    weights[np.arange(size), low] = 1 - (position - low)
    weights[np.arange(size), low + 1] = position - low
    return weights


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Noise of roughly unit scale that varies over about size / cells pixels."""
    coarse = rng.standard_normal((cells + 1, cells + 1), dtype=np.float32)
    weights = _interpolation_matrix(size, cells)
    return weights @ coarse @ weights.T


@functools.lru_cache(maxsize=1)
def _levels() -> np.ndarray:
    return np.linspace(0, 1, 4096, dtype=np.float32)


def _render(rng, view: str, anatomy: _Anatomy, abnormalities, size: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 image [S, S], uint8 region map [S, S]: bit k = LOCALISED_FINDINGS[k])."""
    x0, y0 = _grid(size)
    angle = rng.normal(0, 0.035)
    scale = rng.uniform(0.9, 1.04)
    tx, ty = (float(v) for v in rng.normal(0, 0.035, size=2))
    cos, sin = float(np.cos(angle)), float(np.sin(angle))  # Python floats keep float32.
    x = ((x0 - tx) * cos + (y0 - ty) * sin) / scale
    y = (-(x0 - tx) * sin + (y0 - ty) * cos) / scale
    portable = view == "AP"
    draw = _draw_lateral if view == "LATERAL" else _draw_frontal
    attenuation, masks = draw(rng, x, y, anatomy, abnormalities, portable)
    regions = np.zeros((size, size), np.uint8)
    for k, name in enumerate(LOCALISED_FINDINGS):
        if name in masks:
            regions |= (masks[name] > 0.5).astype(np.uint8) << k

    exposure = rng.uniform(0.85, 1.12) * (0.93 if portable else 1.0)
    offset = rng.uniform(-0.05, 0.06)
    gamma_curve = _levels() ** rng.uniform(0.8, 1.25)  # A lookup table: pow is slow.
    level = np.clip(attenuation * (exposure * 4095) + offset * 4095, 0, 4095)
    image = gamma_curve[level.astype(np.int32)]
    noise_level = rng.uniform(0.01, 0.03) * (1.5 if portable else 1.0)
    image += noise_level * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8), regions


def _find(abnormalities, label: str) -> Abnormality | None:
    return next((a for a in abnormalities if a.label == label), None)


def _thorax_half_width(anatomy: _Anatomy) -> float:
    return anatomy.lung_cx + anatomy.lung_half_width


def _lung(x, y, cx, cy, half_width, half_height):
    """Signed distance to a lung field: an ellipse that narrows towards the apex."""
    taper = 1 - 0.3 * np.clip((cy - y) / half_height, 0, 1)
    radius = np.sqrt(((x - cx) / (half_width * taper)) ** 2 + ((y - cy) / half_height) ** 2)
    return (radius - 1) * half_width


def _tilted_ellipse(x, y, cx, cy, half_width, aspect: float, tilt: float):
    """Signed distance to an ellipse rotated by `tilt` radians with horizontal extent
    `half_width` and long/short axis ratio `aspect`."""
    cos, sin = math.cos(tilt), math.sin(tilt)
    long_axis = half_width / math.hypot(cos, sin / aspect)
    short_axis = long_axis / aspect
    u, v = x - cx, y - cy
    along, across = (u * cos + v * sin) / long_axis, (v * cos - u * sin) / short_axis
    return (np.sqrt(along * along + across * across) - 1) * short_axis


def _draw_frontal(rng, x, y, anatomy: _Anatomy, abnormalities, portable: bool):
    """(attenuation [S, S], finding -> soft mask [S, S] of its visible extent)."""
    size = x.shape[0]
    masks = {}
    body = _inside(_ellipse(x, y, 0.0, 0.25, anatomy.body_half_width, 1.3, boxy=True), 0.08)
    a = 0.4 * body
    lift = 0.05 if portable else 0.0  # Portable films: shallower inspiration.
    domes = {-1: anatomy.dome_right - lift, 1: anatomy.dome_left - lift}
    fine = _smooth_noise(rng, size, 14)
    coarse = _smooth_noise(rng, size, 5)

    lungs, dome_gap = {}, {}
    lung_cy, lung_half_height = -0.1, 0.66
    for side in (-1, 1):
        dome_gap[side] = domes[side] + 0.3 * ((x - side * 0.32) / 0.36) ** 2 - y
        outline = _lung(x, y, side * anatomy.lung_cx, lung_cy, anatomy.lung_half_width,
                        lung_half_height)
        lungs[side] = _inside(np.maximum(outline, -dome_gap[side]), 0.03)
    lung = np.maximum(lungs[-1], lungs[1])
    below_dome = _inside(np.minimum(dome_gap[-1], dome_gap[1]), 0.03) * body
    a += 0.14 * below_dome * _inside(np.abs(x) - 0.75, 0.1)
    if anatomy.gastric_bubble:
        a -= 0.2 * _inside(_ellipse(x, y, 0.32, domes[1] + 0.12, 0.09, 0.05), 0.03)

    hilum = np.sqrt((np.abs(x) - 0.17) ** 2 + (y + 0.02) ** 2)
    markings = 0.05 * np.exp(-hilum / 0.45) * (1 + 0.7 * fine)
    lung_value = 0.16 + markings + 0.06 * (y + 0.1) ** 2 + 0.015 * coarse
    edema = _find(abnormalities, "Edema")
    if edema:  # Perihilar haze, both lungs, fading to the periphery.
        haze = np.exp(-(((np.abs(x) - 0.2) / 0.28) ** 2 + ((y + 0.02) / 0.38) ** 2))
        lung_value += (0.08 + 0.2 * edema.severity) * haze * (0.8 + 0.3 * fine)
    for label in ("Consolidation", "Lung Opacity"):
        airspace = _find(abnormalities, label)
        if airspace:
            cx, cy = LOBES[airspace.lobe]
            patch, extent = _airspace_patch(x, y, cx, cy, airspace, coarse, fine)
            lung_value += patch
            masks[label] = extent * lung
    a = a * (1 - lung) + lung_value * lung

    effusion = _find(abnormalities, "Pleural Effusion")
    if effusion:  # Fluid fills the base; its meniscus climbs the lateral chest wall.
        depth = 0.1 + 0.38 * effusion.severity
        masks["Pleural Effusion"] = np.zeros_like(a)
        for side in _sides(effusion.side):
            lateral = np.clip((side * x - 0.12) / 0.5, 0, 1)
            meniscus = domes[side] + 0.08 - depth - 0.5 * depth * lateral**2
            fluid = lungs[side] * _inside(meniscus - y, 0.05)
            a = a * (1 - fluid) + (0.48 + 0.05 * (y - meniscus)) * fluid
            masks["Pleural Effusion"] = np.maximum(masks["Pleural Effusion"], fluid)

    pneumothorax = _find(abnormalities, "Pneumothorax")
    if pneumothorax:  # Lucent rim without markings around the collapsed lung's edge.
        side = -1 if pneumothorax.side == "right" else 1
        rim = 0.15 + 0.2 * pneumothorax.severity
        collapsed = _lung(x, y, side * (anatomy.lung_cx - 0.5 * rim), lung_cy + 0.8 * rim,
                          anatomy.lung_half_width - 0.9 * rim, lung_half_height - 1.2 * rim)
        lucent = lungs[side] * _inside(-collapsed, 0.02)
        masks["Pneumothorax"] = lucent
        a = a * (1 - lucent)
        # The collapsed lung is denser than an aerated one; its edge is the pleural line.
        a += lungs[side] * (0.12 * pneumothorax.severity * (1 - lucent)
                            + 0.16 * _inside(np.abs(collapsed) - 0.008, 0.01))

    # The heart: its apex points down to the patient's left; its base sits on the diaphragm.
    half_width = anatomy.cardiothoracic_ratio * _thorax_half_width(anatomy)
    half_width *= 1.06 if portable else 1.0  # AP projection magnifies the heart.
    hx = -0.17 - 0.2 * (half_width - 0.29) + half_width
    hy = domes[1] - 0.13
    heart = _inside(_tilted_ellipse(x, y, hx, hy, half_width, 1.3, 0.35), 0.04)
    mediastinum = _inside(np.maximum(np.abs(x - 0.02) - 0.09 - 0.06 * np.clip(y + 0.3, 0, 1),
                                     y - hy), 0.04)
    aortic_knob = _inside(_ellipse(x, y, 0.12, -0.33, 0.075, 0.065), 0.03)
    centre = np.maximum(np.maximum(heart, mediastinum), aortic_knob) * body
    a = a * (1 - centre) + 0.58 * centre
    masks = {name: mask * (1 - centre) for name, mask in masks.items()}  # Hidden behind it.
    a -= 0.14 * _inside(np.maximum(np.abs(x) - 0.03, y + 0.3), 0.02)  # Trachea.

    spine = _inside(np.abs(x) - 0.065, 0.02) * body
    a += spine * (0.06 + 0.04 * np.cos(2 * np.pi * y / 0.14))
    thorax = _inside(np.maximum(np.abs(x) - 0.74, np.abs(y + 0.15) - 0.65), 0.1)
    posterior = 0.5 + 0.5 * np.cos(2 * np.pi * (y - 0.35 * x * x - 0.15 * np.abs(x)) / 0.16)
    anterior = 0.5 + 0.5 * np.cos(2 * np.pi * (y + 0.25 * x * x) / 0.2)
    posterior *= posterior
    anterior *= anterior
    ribs = 0.08 * (posterior * posterior) ** 2 + 0.035 * anterior * anterior * anterior
    a += thorax * (1 - 0.6 * centre) * ribs  # Ribs fade behind the heart.
    clavicle_y = -0.62 - 0.24 * (np.abs(x) - 0.08)
    a += 0.15 * _inside(np.maximum(np.abs(y - clavicle_y) - 0.03,
                                   np.abs(np.abs(x) - 0.38) - 0.29), 0.02)

    devices = _find(abnormalities, "Support Devices")
    if devices:
        a = _draw_devices(x, y, a, devices.devices, _FRONTAL_DEVICE_PATHS, (0.55, -0.62))
    return a, masks


def _draw_lateral(rng, x, y, anatomy: _Anatomy, abnormalities, portable: bool):
    """Side view: anterior to the image left, spine to the image right. Returns what
    `_draw_frontal` returns."""
    size = x.shape[0]
    masks = {}
    body = _inside(_ellipse(x, y, 0.0, 0.2, 0.8, 1.25, boxy=True), 0.08)
    a = 0.44 * body
    fine = _smooth_noise(rng, size, 14)
    coarse = _smooth_noise(rng, size, 5)
    dome = 0.5 * (anatomy.dome_right + anatomy.dome_left)
    dome_gap = dome + 0.25 * ((x + 0.15) / 0.55) ** 2 - y
    lung = _inside(np.maximum(_ellipse(x, y, 0.03, -0.06, 0.52, 0.66), -dome_gap), 0.03)
    a += 0.12 * _inside(dome_gap, 0.03) * body

    hilum = np.sqrt((x - 0.05) ** 2 + (y + 0.02) ** 2)
    lung_value = 0.2 + 0.06 * np.exp(-hilum / 0.4) * (1 + 0.7 * fine) + 0.015 * coarse
    edema = _find(abnormalities, "Edema")
    if edema:
        haze = np.exp(-(((x - 0.05) / 0.35) ** 2 + ((y + 0.02) / 0.4) ** 2))
        lung_value += (0.08 + 0.2 * edema.severity) * haze * (0.8 + 0.3 * fine)
    for label in ("Consolidation", "Lung Opacity"):
        airspace = _find(abnormalities, label)
        if airspace:
            cx, cy = _LATERAL_LOBES[airspace.lobe]
            patch, extent = _airspace_patch(x, y, cx, cy, airspace, coarse, fine)
            lung_value += patch
            masks[label] = extent * lung
    a = a * (1 - lung) + lung_value * lung

    effusion = _find(abnormalities, "Pleural Effusion")
    if effusion:  # Fluid gathers in the posterior costophrenic sulcus.
        depth = (0.1 + 0.38 * effusion.severity) * (1.2 if effusion.side == "bilateral" else 1)
        meniscus = dome + 0.12 - depth - 0.6 * depth * np.clip(x / 0.5, 0, 1) ** 2
        fluid = lung * _inside(meniscus - y, 0.05)
        masks["Pleural Effusion"] = fluid
        a = a * (1 - fluid) + 0.52 * fluid

    pneumothorax = _find(abnormalities, "Pneumothorax")
    if pneumothorax:  # Apical lucency above the collapsed lung's edge.
        rim = 0.15 + 0.2 * pneumothorax.severity
        collapsed = _ellipse(x, y, 0.03, -0.06 + rim, 0.52 - 0.4 * rim, 0.66 - rim)
        lucent = lung * _inside(-collapsed, 0.02)
        masks["Pneumothorax"] = lucent
        a = a * (1 - lucent) + 0.04 * lucent
        a += 0.14 * lung * _inside(np.abs(collapsed) - 0.008, 0.01)

    # The heart fills the anterior-inferior chest; enlargement grows it backwards.
    half_width = 0.31 + 0.8 * (anatomy.cardiothoracic_ratio * _thorax_half_width(anatomy) - 0.29)
    heart = _inside(_tilted_ellipse(x, y, -0.58 + half_width, dome - 0.1, half_width, 1.25,
                                    -0.5), 0.04) * body
    a = a * (1 - heart) + 0.6 * heart
    masks = {name: mask * (1 - heart) for name, mask in masks.items()}
    a -= 0.16 * _polyline(x, y, [(0.0, -1.1), (0.08, -0.25)], 0.07)  # Trachea.

    spine = _inside(np.abs(x - 0.58) - 0.11, 0.02) * body
    vertebrae = 0.5 + 0.5 * np.cos(2 * np.pi * y / 0.15)
    a += spine * (0.1 + 0.12 * vertebrae * vertebrae)
    sternum = _inside(np.maximum(np.abs(x + 0.66) - 0.03, np.abs(y + 0.15) - 0.5), 0.03)
    a += 0.16 * sternum
    devices = _find(abnormalities, "Support Devices")
    if devices:
        a = _draw_devices(x, y, a, devices.devices, _LATERAL_DEVICE_PATHS, (-0.62, -0.5))
    return a, masks


_LATERAL_LOBES = {  # Lateral-view centre (x, y) of each LOBES region; both sides overlap.
    "right upper lobe": (0.05, -0.35), "left upper lobe": (0.05, -0.35),
    "right middle lobe": (-0.22, 0.08), "lingula": (-0.22, 0.08),
    "right lower lobe": (0.3, 0.22), "left lower lobe": (0.3, 0.22),
}


def _sides(side: str) -> tuple[int, ...]:
    return {"right": (-1,), "left": (1,), "bilateral": (-1, 1)}[side]


def _airspace_patch(x, y, cx, cy, airspace: Abnormality, coarse, fine):
    """(airspace density, its extent in [0, 1]). Consolidation: dense, sharply
    marginated, lobar. Lung opacity: faint, wide, ill-defined haze (ground glass) that
    leaves the markings visible; its extent is the Gaussian's profile (> 0.5: within
    the half maximum)."""
    if airspace.label == "Lung Opacity":
        radius = 0.22 + 0.16 * airspace.severity
        blob = np.exp(-(((x - cx) / radius) ** 2 + ((y - cy) / (0.85 * radius)) ** 2))
        return (0.26 + 0.14 * airspace.severity) * blob * (0.8 + 0.3 * coarse), blob
    radius = 0.16 + 0.13 * airspace.severity
    edge = np.sqrt(((x - cx) / radius) ** 2 + ((y - cy) / (0.85 * radius)) ** 2) - 1
    blob = _inside(edge + 0.15 * coarse, 0.12)
    return ((0.35 + 0.2 * airspace.severity) * blob * (0.85 + 0.1 * coarse + 0.1 * fine),
            blob)


_FRONTAL_DEVICE_PATHS = {
    "endotracheal_tube": [(0.0, -1.1), (0.0, -0.45)],
    "right_ij_catheter": [(-0.22, -1.1), (-0.15, -0.6), (-0.07, -0.42), (-0.06, -0.2)],
    "left_subclavian_catheter": [(0.72, -0.62), (0.35, -0.58), (0.08, -0.5), (-0.05, -0.22)],
    "enteric_tube": [(0.0, -1.1), (0.02, -0.3), (0.05, 0.35), (0.25, 0.55), (0.36, 0.5)],
    "pacemaker": [(0.55, -0.62), (0.2, -0.45), (0.0, -0.2), (0.08, 0.32)],
}
_LATERAL_DEVICE_PATHS = {
    "endotracheal_tube": [(0.0, -1.1), (0.07, -0.4)],
    "right_ij_catheter": [(0.05, -1.1), (-0.05, -0.6), (-0.15, -0.25)],
    "left_subclavian_catheter": [(-0.3, -0.75), (-0.1, -0.55), (-0.15, -0.25)],
    "enteric_tube": [(0.1, -1.1), (0.16, -0.3), (0.12, 0.35), (-0.1, 0.62)],
    "pacemaker": [(-0.62, -0.5), (-0.35, -0.2), (-0.3, 0.25)],
}


def _draw_devices(x, y, a, devices, paths, pacemaker_centre):
    metal = np.zeros_like(a)
    for device in devices:
        metal = np.maximum(metal, _polyline(x, y, paths[device], 0.045))
        if device == "pacemaker":
            box = _ellipse(x, y, *pacemaker_centre, 0.1, 0.07, boxy=True)
            metal = np.maximum(metal, _inside(box, 0.02))
    return a + (1.0 - a) * 0.85 * metal


# ------------------------------------------------------------------------------ reports


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _grade(severity: float) -> int:
    return 0 if severity < 0.4 else 1 if severity < 0.75 else 2


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


_NORMAL_FINDINGS = (  # (text, labels, weight)
    ("The lungs are clear. The cardiomediastinal silhouette is within normal limits. "
     "No pleural effusion or pneumothorax.",
     {"Enlarged Cardiomediastinum": 0.0, "Pleural Effusion": 0.0, "Pneumothorax": 0.0}, 0.5),
    ("Heart size is normal. The lungs are clear without focal consolidation. "
     "No pleural effusion or pneumothorax.",
     {"Cardiomegaly": 0.0, "Consolidation": 0.0, "Pleural Effusion": 0.0,
      "Pneumothorax": 0.0}, 0.3),
    ("The heart and mediastinum are unremarkable. The lungs are clear. "
     "There is no pleural effusion or pneumothorax.",
     {"Cardiomegaly": 0.0, "Enlarged Cardiomediastinum": 0.0, "Pleural Effusion": 0.0,
      "Pneumothorax": 0.0}, 0.2),
)
_NORMAL_IMPRESSIONS = (("No acute cardiopulmonary process.", 0.7),
                       ("No acute cardiopulmonary abnormality.", 0.2),
                       ("No acute intrathoracic process.", 0.1))
_INDICATIONS = ("cough", "shortness of breath", "chest pain", "fever", "dyspnea",
                "preoperative evaluation", "weakness")


def _write_report(rng, abnormalities, views) -> tuple[str, np.ndarray]:
    """The report text and its labels, both written from the drawn abnormalities."""
    findings: list[tuple[int, str]] = []  # (position in the report, sentence)
    impression: list[str] = []
    labels = np.full(len(CHEXPERT_FINDINGS), np.nan, dtype=np.float32)

    def state(position, sentence, sentence_labels, impression_sentence=None):
        if sentence:
            findings.append((position, sentence))
        if impression_sentence:
            impression.append(impression_sentence)
        for name, value in sentence_labels.items():
            old = labels[FINDING_INDEX[name]]
            if np.isnan(old) or value == 1.0 or (value == -1.0 and old == 0.0):
                labels[FINDING_INDEX[name]] = value

    if not abnormalities:
        weights = [w for *_, w in _NORMAL_FINDINGS]
        text, normal_labels, _ = _NORMAL_FINDINGS[rng.choice(len(weights), p=weights)]
        state(0, text, {**normal_labels, "No Finding": 1.0})
        weights = [w for _, w in _NORMAL_IMPRESSIONS]
        impression.append(_NORMAL_IMPRESSIONS[rng.choice(len(weights), p=weights)][0])
    else:
        for abnormality in abnormalities:
            position, sentence, summary = _describe(rng, abnormality)
            value = -1.0 if abnormality.uncertain else 1.0
            state(position, sentence, {abnormality.label: value}, summary)
        _negate_absent(rng, abnormalities, state)
        if not _find(abnormalities, "Pneumothorax") and rng.random() < 0.15:
            state(0, None, {"Pneumothorax": 0.0}, "No pneumothorax.")

    findings_text = " ".join(s for _, s in sorted(findings, key=lambda item: item[0]))
    exam = {("PA", "LATERAL"): "CHEST (PA AND LAT)", ("PA",): "CHEST (PA)",
            ("AP",): "CHEST (PORTABLE AP)"}[tuple(views)]
    report = (f"EXAMINATION: {exam}\n\nINDICATION: ___ with {_pick(rng, _INDICATIONS)}.\n\n"
              f"FINDINGS: {findings_text}\n\nIMPRESSION: {' '.join(impression)}\n")
    return report, labels


def _negate_absent(rng, abnormalities, state) -> None:
    present = {a.label for a in abnormalities}
    if "Cardiomegaly" not in present and rng.random() < 0.6:
        state(1, _pick(rng, ("Heart size is normal.", "The cardiac silhouette is normal in size.",
                             "The heart is not enlarged.")), {"Cardiomegaly": 0.0})
    if rng.random() < 0.25:
        state(2, _pick(rng, ("The mediastinal contours are normal.",
                             "Mediastinal contours are unremarkable.")),
              {"Enlarged Cardiomediastinum": 0.0})
    if not present & {"Consolidation", "Lung Opacity"} and rng.random() < 0.45:
        state(5, _pick(rng, ("No focal consolidation.", "There is no focal consolidation.")),
              {"Consolidation": 0.0})
    if "Edema" not in present and rng.random() < 0.3:
        state(6, _pick(rng, ("No pulmonary edema.", "There is no pulmonary edema.")),
              {"Edema": 0.0})
    pleura_absent = {"Pleural Effusion", "Pneumothorax"} - present
    if len(pleura_absent) == 2 and rng.random() < 0.5:
        state(8, "No pleural effusion or pneumothorax.",
              {"Pleural Effusion": 0.0, "Pneumothorax": 0.0})
    else:
        if "Pleural Effusion" in pleura_absent and rng.random() < 0.45:
            state(7, _pick(rng, ("No pleural effusion.", "There is no pleural effusion.")),
                  {"Pleural Effusion": 0.0})
        if "Pneumothorax" in pleura_absent and rng.random() < 0.45:
            state(8, _pick(rng, ("No pneumothorax.", "There is no pneumothorax.")),
                  {"Pneumothorax": 0.0})
    if rng.random() < 0.1:
        state(10, "No displaced rib fracture.", {"Fracture": 0.0})


_DEVICE_SENTENCES = {
    "endotracheal_tube": ("Endotracheal tube terminates {cm} cm above the carina.",
                          "An endotracheal tube is in standard position."),
    "right_ij_catheter": ("Right internal jugular central venous catheter terminates in the "
                          "mid SVC.", "Right IJ catheter tip projects over the SVC."),
    "left_subclavian_catheter": ("Left subclavian central venous catheter tip projects over "
                                 "the SVC.", "A left subclavian catheter ends in the low SVC."),
    "enteric_tube": ("Enteric tube courses below the diaphragm.",
                     "Nasogastric tube tip is in the stomach."),
    "pacemaker": ("Left chest wall pacemaker with leads in the right atrium and right "
                  "ventricle.", "Left-sided pacemaker device with leads in standard position."),
}


def _describe(rng, a: Abnormality) -> tuple[int, str, str | None]:
    """(position in findings, findings sentence, impression sentence or None)."""
    grade = _grade(a.severity)
    if a.label == "Support Devices":
        sentences = [_pick(rng, _DEVICE_SENTENCES[d]).format(cm=int(rng.integers(3, 7)))
                     for d in a.devices]
        summary = _pick(rng, (None, "Support devices as above.",
                              "Support devices in standard position."))
        return 0, " ".join(sentences), summary

    if a.label == "Cardiomegaly":
        if a.uncertain:
            return 1, _pick(rng, ("The heart size is borderline.",
                                  "Borderline enlargement of the cardiac silhouette.",
                                  "Possible mild cardiomegaly.")), _pick(
                rng, ("Borderline cardiomegaly.", "Possible mild cardiomegaly."))
        degree = ("mild", "moderate", "severe")[grade]
        adverb = ("mildly", "moderately", "markedly")[grade]
        sentence = _pick(rng, (f"The heart is {adverb} enlarged.",
                               f"There is {degree} cardiomegaly.",
                               f"The cardiac silhouette is {adverb} enlarged.",
                               f"{_cap(degree)} enlargement of the cardiac silhouette."))
        return 1, sentence, _pick(rng, (f"{_cap(degree)} cardiomegaly.", "Cardiomegaly."))

    if a.label == "Pleural Effusion":
        both = a.side == "bilateral"
        noun = "pleural effusions" if both else "pleural effusion"
        angle = "costophrenic angles" if both else "costophrenic angle"
        if a.uncertain:
            small = f"small {a.side} {noun}"
            return 7, _pick(rng, (
                f"Blunting of the {a.side} {angle} may represent {'' if both else 'a '}{small}.",
                f"Possible {small}.",
                f"{_cap(small) if both else 'A ' + small} cannot be excluded.",
            )), f"Possible {small}."
        size = ("small", "moderate", "large")[grade]
        sided = a.side if both else f"{a.side}-sided"
        sentence = _pick(rng, (
            f"{_cap(size)} {a.side} {noun}.",
            f"There {'are' if both else 'is a'} {size} {sided} {noun}.",
            f"{_cap(size)} {a.side} {noun} with blunting of the {angle}.",
            f"{'' if both else 'A '}{size} {a.side} {noun} {'are' if both else 'is'} present.",
        ))
        return 7, _cap(sentence), _pick(rng, (f"{_cap(size)} {a.side} {noun}.",
                                              f"{_cap(a.side)} {noun}."))

    if a.label == "Pneumothorax":
        if a.uncertain:
            return 8, _pick(rng, (
                f"Possible tiny {a.side} apical pneumothorax.",
                f"A tiny {a.side} apical pneumothorax cannot be excluded.",
                f"A thin {a.side} apical line may represent a tiny pneumothorax.",
            )), f"Possible tiny {a.side} pneumothorax."
        size = ("small", "moderate", "large")[grade]
        sentence = _pick(rng, (
            f"{_cap(size)} {a.side} apical pneumothorax with a visible pleural line.",
            f"There is a {size} {a.side} pneumothorax.",
            f"{_cap(size)} {a.side}-sided pneumothorax.",
            f"A {size} {a.side} pneumothorax is present.",
        ))
        return 8, sentence, _pick(rng, (f"{_cap(size)} {a.side} pneumothorax.",
                                        f"{_cap(a.side)} pneumothorax."))

    if a.label == "Consolidation":
        if a.uncertain:
            return 4, _pick(rng, (
                f"Possible early consolidation in the {a.lobe}.",
                f"Consolidation in the {a.lobe} cannot be excluded.",
                f"Subtle increased density in the {a.lobe} may represent early consolidation.",
            )), f"Possible {a.lobe} consolidation."
        adjective = ("patchy", "focal", "dense")[grade]
        sentence = _pick(rng, (f"{_cap(adjective)} consolidation in the {a.lobe}.",
                               f"There is {adjective} consolidation in the {a.lobe}.",
                               f"{_cap(adjective)} {a.lobe} consolidation."))
        return 4, sentence, _pick(rng, (f"{_cap(a.lobe)} consolidation.",
                                        f"{_cap(adjective)} {a.lobe} consolidation."))

    if a.label == "Lung Opacity":
        if a.uncertain:
            return 4, _pick(rng, (
                f"Questionable subtle opacity in the {a.lobe}.",
                f"Possible faint opacity in the {a.lobe}.",
                f"Faint opacity in the {a.lobe} may represent early airspace disease.",
            )), f"Possible {a.lobe} opacity."
        adjective = ("small", "moderate-sized", "large")[grade]
        sentence = _pick(rng, (f"{_cap(adjective)} opacity in the {a.lobe}.",
                               f"There is a {adjective} airspace opacity in the {a.lobe}.",
                               f"{_cap(adjective)} opacity projecting over the {a.lobe}."))
        return 4, sentence, _pick(rng, (f"{_cap(a.lobe)} opacity.",
                                        f"{_cap(adjective)} {a.lobe} airspace opacity."))

    if a.label == "Edema":
        if a.uncertain:
            return 6, _pick(rng, (
                "Possible mild interstitial edema.",
                "Mild perihilar haziness may represent early pulmonary edema.",
                "Mild pulmonary edema cannot be excluded.",
            )), "Possible mild pulmonary edema."
        degree = ("mild", "moderate", "severe")[grade]
        sentence = _pick(rng, (f"{_cap(degree)} pulmonary edema.",
                               f"There is {degree} interstitial pulmonary edema.",
                               f"Diffuse perihilar haziness consistent with {degree} "
                               "pulmonary edema.",
                               f"Findings are consistent with {degree} pulmonary edema."))
        return 6, sentence, _pick(rng, (f"{_cap(degree)} pulmonary edema.", "Pulmonary edema."))

    raise ValueError(f"no report template for {a.label!r}")
