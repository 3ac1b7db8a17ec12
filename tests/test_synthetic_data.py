"""The synthetic study generator: determinism, report/label agreement, visible findings."""

import re

import numpy as np
import pytest

from input_pipeline import synthetic_cxr
from input_pipeline.findings import CHEXPERT_FINDINGS, FINDING_INDEX, SYNTHETIC_FINDINGS

# What a reader would look for in the text, per label the generator may mention.
KEYWORDS = {
    "Cardiomegaly": ("cardiomegaly", "heart", "cardiac silhouette"),
    "Enlarged Cardiomediastinum": ("cardiomediastinal", "mediastin"),
    "Pleural Effusion": ("effusion",),
    "Pneumothorax": ("pneumothora",),
    "Consolidation": ("consolidation",),
    "Lung Opacity": ("opacit", "airspace"),
    "Edema": ("edema",),
    "Support Devices": ("tube", "catheter", "pacemaker", "device"),
    "Fracture": ("fracture",),
}
NEGATION = re.compile(r"\b(no|not|without|normal|unremarkable)\b")
UNCERTAINTY = re.compile(r"\b(possible|borderline|cannot be excluded|may represent|"
                         r"questionable)\b")


def sentences(study):
    findings, impression = synthetic_cxr.report_sections(study.report)
    text = f"{findings} {impression}".lower()
    return [s.strip() for s in text.split(". ") if s.strip()]


def test_same_seed_same_study_other_seed_other_study():
    a = synthetic_cxr.generate_study(0, "train", 7)
    b = synthetic_cxr.generate_study(0, "train", 7)
    assert a.report == b.report and a.study_id == b.study_id and a.views == b.views
    np.testing.assert_array_equal(a.labels, b.labels)
    for x, y in zip(a.images, b.images, strict=True):
        np.testing.assert_array_equal(x, y)
    for other in (synthetic_cxr.generate_study(1, "train", 7),
                  synthetic_cxr.generate_study(0, "test", 7),
                  synthetic_cxr.generate_study(0, "train", 8)):
        assert other.study_id != a.study_id
        assert not np.array_equal(other.images[0], a.images[0])


def test_report_and_labels_do_not_depend_on_image_size():
    small = synthetic_cxr.generate_study(3, "validation", 11, source_image_size=32)
    large = synthetic_cxr.generate_study(3, "validation", 11, source_image_size=96)
    assert small.report == large.report
    np.testing.assert_array_equal(small.labels, large.labels)
    assert small.images[0].shape == (32, 32) and large.images[0].shape == (96, 96)
    assert large.images[0].dtype == np.uint8


def test_labels_agree_with_report_text():
    for index in range(200):
        study = synthetic_cxr.generate_study(0, "train", index, source_image_size=16)
        said = sentences(study)
        for name, value in zip(CHEXPERT_FINDINGS, study.labels, strict=True):
            if name == "No Finding":
                continue
            keywords = KEYWORDS.get(name, (name.lower(),))
            mentions = [s for s in said if any(k in s for k in keywords)]
            context = f"{name}={value} in {study.report!r}"
            if np.isnan(value):
                assert not mentions, context
            elif value == 1.0:
                assert any(not NEGATION.search(s) and not UNCERTAINTY.search(s)
                           for s in mentions), context
            elif value == -1.0:
                assert mentions and all(UNCERTAINTY.search(s) for s in mentions), context
            else:
                assert value == 0.0 and mentions, context
                assert all(NEGATION.search(s) for s in mentions), context
        no_finding = study.labels[FINDING_INDEX["No Finding"]]
        if study.is_normal:
            assert no_finding == 1.0
            assert not np.any(np.isin(study.labels[1:], (1.0, -1.0)))
        else:
            assert np.isnan(no_finding)
            for abnormality in study.abnormalities:
                expected = -1.0 if abnormality.uncertain else 1.0
                assert study.labels[FINDING_INDEX[abnormality.label]] == expected
                assert abnormality.label in SYNTHETIC_FINDINGS


def test_size_words_follow_drawn_size():
    words = {"small": [], "large": []}
    for index in range(400):
        study = synthetic_cxr.generate_study(1, "train", index, source_image_size=16)
        effusion = next((a for a in study.abnormalities
                         if a.label == "Pleural Effusion" and not a.uncertain), None)
        if effusion:
            findings, _ = synthetic_cxr.report_sections(study.report)
            for word, severities in words.items():
                pattern = rf"\b{word} {effusion.side}(-sided)? (pleural )?effusion"
                if re.search(pattern, findings.lower()):
                    severities.append(effusion.severity)
    assert len(words["small"]) >= 5 and len(words["large"]) >= 5
    assert max(words["small"]) < min(words["large"])


def test_study_mix_matches_design():
    studies = [synthetic_cxr.generate_study(2, "train", i, source_image_size=16)
               for i in range(1000)]
    normal = np.mean([s.is_normal for s in studies])
    two_view = np.mean([len(s.views) == 2 for s in studies])
    assert abs(normal - synthetic_cxr.NORMAL_FRACTION) < 0.05
    assert abs(two_view - synthetic_cxr.TWO_VIEW_FRACTION) < 0.05
    for s in studies:
        assert s.views in (("PA",), ("AP",), ("PA", "LATERAL"))
        assert s.is_normal or 1 <= len(s.abnormalities) <= 3
        assert re.fullmatch(r"s5\d{7}", s.study_id) and re.fullmatch(r"p1\d{7}", s.patient_id)
        ratio_enlarged = s.cardiothoracic_ratio > 0.5
        assert ratio_enlarged == any(a.label == "Cardiomegaly" for a in s.abnormalities)
    # Normal reports are near-identical on purpose: a handful of distinct texts.
    normal_reports = {synthetic_cxr.report_sections(s.report) for s in studies if s.is_normal}
    assert len(normal_reports) <= 9
    assert len({s.study_id for s in studies}) == len(studies)


def test_report_sections():
    report = ("EXAMINATION: CHEST (PA)\n\nINDICATION: ___ with cough.\n\n"
              "FINDINGS: The lungs\n are clear.\n\nIMPRESSION: No acute process.\n")
    assert synthetic_cxr.report_sections(report) == ("The lungs are clear.", "No acute process.")
    assert synthetic_cxr.report_sections("IMPRESSION: Normal.") == ("", "Normal.")
    study = synthetic_cxr.generate_study(0, "train", 3)
    findings, impression = synthetic_cxr.report_sections(study.report)
    assert findings and impression and "FINDINGS" not in findings + impression


@pytest.fixture(scope="module")
def frontal_images():
    """(study, 64x64 frontal image as float) for 900 studies."""
    studies = [synthetic_cxr.generate_study(5, "train", i, source_image_size=64)
               for i in range(900)]
    return [(s, s.images[0].astype(np.float32)) for s in studies]


def region(x0, x1, y0, y1, size=64):
    """Pixels of the anatomy box [x0, x1] x [y0, y1] (x to the image right, y down)."""
    pixel = lambda v: int(round((v + 1) / 2 * size))
    return slice(pixel(y0), pixel(y1)), slice(pixel(x0), pixel(x1))


def only(frontal_images, label, predicate=lambda a: True):
    """Images whose single pathology is `label` (support devices allowed)."""
    chosen = []
    for study, image in frontal_images:
        pathologies = [a for a in study.abnormalities if a.label != "Support Devices"]
        if len(pathologies) == 1 and pathologies[0].label == label and predicate(pathologies[0]):
            chosen.append(image)
    return chosen


def normals(frontal_images):
    return [image for study, image in frontal_images if study.is_normal]


def assert_brighter(group, baseline, statistic, min_difference, min_t=4.0):
    """The group's mean statistic exceeds the baseline's by a margin and clearly (t)."""
    g = np.array([statistic(image) for image in group])
    b = np.array([statistic(image) for image in baseline])
    difference = g.mean() - b.mean()
    t = difference / np.sqrt(g.var() / len(g) + b.var() / len(b))
    assert len(g) >= 15 and len(b) >= 50
    assert difference > min_difference and t > min_t, (difference, t)


def test_cardiomegaly_widens_the_heart(frontal_images):
    beside_normal_heart = region(0.3, 0.55, 0.0, 0.35)  # Patient's left of a normal heart.
    assert_brighter(only(frontal_images, "Cardiomegaly"), normals(frontal_images),
                    lambda image: image[beside_normal_heart].mean(), 20)


@pytest.mark.parametrize("side, box", [("left", (0.45, 0.68)), ("right", (-0.68, -0.45))])
def test_effusion_whitens_the_lung_base(frontal_images, side, box):
    base = region(*box, 0.1, 0.33)
    effusions = only(frontal_images, "Pleural Effusion", lambda a: a.side in (side, "bilateral"))
    assert_brighter(effusions, normals(frontal_images), lambda image: image[base].mean(), 15)


@pytest.mark.parametrize("side", [-1, 1])
def test_pneumothorax_darkens_the_upper_lung(frontal_images, side):
    def upper_lung(s):
        return region(*sorted((s * 0.2, s * 0.65)), -0.75, -0.2)

    def contralateral_minus_affected(image):  # Paired within an image: exposure cancels.
        return image[upper_lung(-side)].mean() - image[upper_lung(side)].mean()

    name = "left" if side == 1 else "right"
    pneumothoraces = only(frontal_images, "Pneumothorax", lambda a: a.side == name)
    # Rims grow with severity, so the effect is large (> 5 grey levels) but varies a lot.
    assert_brighter(pneumothoraces, normals(frontal_images), contralateral_minus_affected, 5,
                    min_t=2.0)


def test_airspace_disease_whitens_its_lobe(frontal_images):
    def lobe_brightness_for(study_lobe):
        cx, cy = synthetic_cxr.LOBES[study_lobe]
        return region(cx - 0.1, cx + 0.1, cy - 0.1, cy + 0.1)

    lobe = "right lower lobe"
    box = lobe_brightness_for(lobe)
    group = [image for label in ("Consolidation", "Lung Opacity")
             for image in only(frontal_images, label, lambda a: a.lobe == lobe)]
    baseline = normals(frontal_images)
    g = np.mean([image[box].mean() for image in group])
    b = np.mean([image[box].mean() for image in baseline])
    assert len(group) >= 5 and g - b > 15


def test_edema_whitens_the_hila(frontal_images):
    perihilar = region(-0.4, -0.15, -0.2, 0.15)
    assert_brighter(only(frontal_images, "Edema"), normals(frontal_images),
                    lambda image: image[perihilar].mean(), 10)
