"""Report parsing: section headers, the fallback, cleaning, sentence splitting."""

import pytest

from input_pipeline.reports import (
    EXCLUDED,
    FINDINGS,
    OTHER,
    Sections,
    clean_section,
    parse_report,
    sections,
    split_sentences,
)

MIMIC_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset ascites  // eval for infection

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  None.

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows. The
 cardiomediastinal silhouette is normal.

 IMPRESSION:

 No acute cardiopulmonary process.
"""

# (report, expected findings, expected impression, expected used_fallback)
VARIANTS = [
    pytest.param(MIMIC_REPORT,
                 "There is no focal consolidation, pleural effusion or pneumothorax. Bilateral "
                 "nodular opacities that most likely represent nipple shadows. The "
                 "cardiomediastinal silhouette is normal.",
                 "No acute cardiopulmonary process.", False, id="mimic"),
    pytest.param("Findings: Lungs are clear.\nImpression: Normal chest.",
                 "Lungs are clear.", "Normal chest.", False, id="title-case-inline"),
    pytest.param("INDICATION: cough. FINDINGS: Heart is enlarged. IMPRESSION: Cardiomegaly.",
                 "Heart is enlarged.", "Cardiomegaly.", False, id="one-line"),
    pytest.param("HISTORY: fever\n\nFINDINGS AND IMPRESSION:\nSmall left effusion.",
                 "Small left effusion.", "", False, id="combined-header"),
    pytest.param("Findings\nMild edema.\n\nSummary\nCHF.", "Mild edema.", "CHF.", False,
                 id="headers-without-colon"),
    pytest.param("COMPARISON: ___.\n\nCONCLUSION: No pneumothorax.", "", "No pneumothorax.",
                 False, id="conclusion-only"),
    pytest.param("IMPRESSIONS:\n1. Low lung volumes.\n2. No effusion.", "",
                 "1. Low lung volumes. 2. No effusion.", False, id="numbered-impression"),
    pytest.param("FINDINGS: LUNGS: Clear. HEART: Normal size.\nRECOMMENDATION(S): Follow up.",
                 "LUNGS: Clear. HEART: Normal size.", "", False, id="subheaders-stay"),
    pytest.param("Heart size is normal. Lungs are clear.",
                 "Heart size is normal. Lungs are clear.", "", True, id="free-text"),
    pytest.param(" FINAL REPORT\n INDICATION: chest pain\n\n COMPARISON: ___\n\n"
                 " PA and lateral views. Lungs are clear.\n",
                 "PA and lateral views. Lungs are clear.", "", True, id="body-after-comparison"),
    pytest.param("FINDINGS: Clear lungs.\n\nNOTIFICATION: Dr. ___ was told at ___.",
                 "Clear lungs.", "", False, id="notification-excluded"),
    pytest.param("FINDINGS: A\nIMPRESSION: B\n\nADDENDUM: FINDINGS: C", "A C", "B", False,
                 id="addendum-joined"),
]


@pytest.mark.parametrize("text, findings, impression, fallback", VARIANTS)
def test_sections_of_report_variants(text, findings, impression, fallback):
    sections = parse_report(text)
    assert sections.findings == findings
    assert sections.impression == impression
    assert sections.used_fallback is fallback
    assert not sections.is_empty


@pytest.mark.parametrize("text", [
    "", "   \n\n ", "___", "INDICATION: cough\n\nCOMPARISON: None.",
    "FINDINGS:\n\nIMPRESSION: ___\n",
])
def test_reports_without_model_text_are_empty(text):
    assert parse_report(text).is_empty


def test_full_report_is_cleaned_but_keeps_headers_and_paragraphs():
    report = parse_report(MIMIC_REPORT).report
    assert report.startswith("FINAL REPORT\nEXAMINATION: CHEST (PA AND LAT)\n\nINDICATION: F")
    assert "___" not in report and "  " not in report
    assert "\n\nIMPRESSION:\n\nNo acute cardiopulmonary process." in report
    assert isinstance(parse_report(MIMIC_REPORT), Sections)


@pytest.mark.parametrize("raw, clean", [
    ("Dr. ___ was notified at ___ on ___.", "Dr. was notified at on."),
    ("Compared to ___ ( ___ ), stable.", "Compared to, stable."),
    ("  : - Lungs   are\n clear ,  .  ", "Lungs are clear."),
    ("Heart normal. . No effusion..", "Heart normal. No effusion."),
    ("1.5 cm nodule; unchanged", "1.5 cm nodule; unchanged"),
])
def test_clean_section(raw, clean):
    assert clean_section(raw) == clean


@pytest.mark.parametrize("text, sentences", [
    ("A 1.5 cm nodule is seen. No effusion.", ["A 1.5 cm nodule is seen.", "No effusion."]),
    ("Discussed with Dr. Smith at 10 a.m. on the ward. Stable.",
     ["Discussed with Dr. Smith at 10 a.m. on the ward.", "Stable."]),
    ("1. Normal heart. 2. No effusion.", ["1. Normal heart.", "2. No effusion."]),
    ("Tubes, e.g. ET tube, are seen. Approx. 2 cm. Lines etc. Fine!",
     ["Tubes, e.g. ET tube, are seen.", "Approx. 2 cm.", "Lines etc.", "Fine!"]),
    ("Lungs clear.\n\nheart normal", ["Lungs clear.", "heart normal"]),
    ("Is there fluid? No. Value 0.5.", ["Is there fluid?", "No.", "Value 0.5."]),
    ("", []),
])
def test_split_sentences(text, sentences):
    assert split_sentences(text) == sentences


def test_sections_with_and_without_other_headers():
    text = "Portable film.\nINDICATION: Cough.\nLUNGS: Clear.\nFindings: No effusion."
    preamble, found = sections(text)
    assert preamble == "Portable film.\n"
    assert [(s.name, s.kind, s.text) for s in found] == [
        ("indication", EXCLUDED, " Cough.\nLUNGS: Clear.\n"),
        ("findings", FINDINGS, " No effusion.")]
    _, found = sections(text, other_headers=True)
    assert [(s.name, s.kind) for s in found] == [
        ("indication", EXCLUDED), ("lungs", OTHER), ("findings", FINDINGS)]
    assert found[1].text == " Clear.\n"
    assert sections("No headers here.") == ("No headers here.", [])
