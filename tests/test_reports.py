"""Report parsing: section headers, the fallback, cleaning, sentence splitting."""

import pytest

from input_pipeline.reports import (
    DEID_MODES,
    DEID_TOKEN,
    EXCLUDED,
    FINDINGS,
    IMPRESSION,
    OTHER,
    Placeholders,
    Sections,
    clean_report,
    clean_section,
    join_hyphenated_lines,
    parse_report,
    sections,
    split_sentences,
)
from jaxmedclip import config_schema

TOKEN = Placeholders("token")

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


# ------------------------------------------------------------------- header variants

# (text, [(name, kind, section text stripped)]) as `sections` finds them.
HEADERS = [
    pytest.param("FINDINGS: A.", [("findings", FINDINGS, "A.")], id="upper-line-start"),
    pytest.param("Findings: A.", [("findings", FINDINGS, "A.")], id="title-line-start"),
    pytest.param("  findings : A.", [("findings", FINDINGS, "A.")], id="lower-line-start"),
    pytest.param("FINDINGS\nA.", [("findings", FINDINGS, "A.")], id="bare-line-upper"),
    pytest.param("Impression\nB.", [("impression", IMPRESSION, "B.")], id="bare-line-title"),
    pytest.param("Lungs clear. Impression: B.", [("impression", IMPRESSION, "B.")],
                 id="title-after-period"),
    pytest.param("Lungs clear;IMPRESSION: B.", [("impression", IMPRESSION, "B.")],
                 id="upper-after-semicolon"),
    pytest.param("Heart normal IMPRESSION: B.", [("impression", IMPRESSION, "B.")],
                 id="upper-mid-line"),
    pytest.param("Heart normal\tCONCLUSION : B.", [("conclusion", IMPRESSION, "B.")],
                 id="upper-mid-line-after-tab"),
    pytest.param("Heart normal Impression: B.", [], id="title-mid-line-is-prose"),
    pytest.param("Reviewed, the findings: small effusion.", [], id="lower-mid-line-is-prose"),
    pytest.param("Heart normal IMPRESSION B.", [], id="mid-line-without-colon"),
    pytest.param("Heart normal.\nIMPRESSION B.", [], id="line-start-without-colon-and-text"),
    pytest.param("INDICATION: Cough FINDINGS AND IMPRESSION: Normal.",
                 [("indication", EXCLUDED, "Cough"),
                  ("findings and impression", FINDINGS, "Normal.")], id="combined-mid-line"),
    pytest.param("Findings/Impression: Normal.",
                 [("findings/impression", FINDINGS, "Normal.")], id="combined-slash"),
    pytest.param("Seen. CLINICAL HISTORY: x",
                 [("clinical history", EXCLUDED, "x")], id="longest-name-wins"),
    pytest.param("Follow up RECOMMENDATION(S): CT.",
                 [("recommendation(s)", EXCLUDED, "CT.")], id="recommendations-mid-line"),
    pytest.param("FINDINGS: PA AND LATERAL VIEWS: clear. PRIOR STUDY: none",
                 [("findings", FINDINGS, "PA AND LATERAL VIEWS: clear. PRIOR STUDY: none")],
                 id="views-study-not-mid-line"),
    pytest.param("FINDINGS: A IMPRESSION: B ADDENDUM: FINDINGS: C",
                 [("findings", FINDINGS, "A"), ("impression", IMPRESSION, "B"),
                  ("addendum", EXCLUDED, ""), ("findings", FINDINGS, "C")],
                 id="addendum-flattened"),
    pytest.param("IMPRESSION: B\n\nAddendum:\nFindings: C",
                 [("impression", IMPRESSION, "B"), ("addendum", EXCLUDED, ""),
                  ("findings", FINDINGS, "C")], id="addendum-lines"),
]


@pytest.mark.parametrize("text, expected", HEADERS)
def test_header_variants(text, expected):
    _, found = sections(text)
    assert [(s.name, s.kind, s.text.strip()) for s in found] == expected


def test_other_headers_stay_at_line_starts_but_known_ones_split_flattened_text():
    text = "INDICATION: Cough LUNGS: clear FINDINGS: No effusion.\nHEART: Normal."
    _, found = sections(text, other_headers=True)
    assert [(s.name, s.kind, s.text.strip()) for s in found] == [
        ("indication", EXCLUDED, "Cough LUNGS: clear"),
        ("findings", FINDINGS, "No effusion."), ("heart", OTHER, "Normal.")]


# Flattened reports as real exports write them (line breaks lost), after MIMIC-CXR, IU X-ray
# and MIMIC-III styles: (report, expected findings, expected impression).
FLATTENED = [
    pytest.param("INDICATION: Cough FINDINGS: Heart size normal. IMPRESSION: Normal chest.",
                 "Heart size normal.", "Normal chest.", id="issue-example"),
    pytest.param("FINAL REPORT EXAMINATION: CHEST (PA AND LAT) INDICATION: ___F with fever "
                 "TECHNIQUE: Chest PA and lateral COMPARISON: ___ FINDINGS: The lungs are "
                 "clear. No pleural effusion or pneumothorax. The cardiomediastinal "
                 "silhouette is normal. IMPRESSION: No acute cardiopulmonary process.",
                 "The lungs are clear. No pleural effusion or pneumothorax. The "
                 "cardiomediastinal silhouette is normal.",
                 "No acute cardiopulmonary process.", id="mimic-cxr"),
    pytest.param("COMPARISON: XXXX INDICATION: XXXX-year-old male with chest pain. FINDINGS: "
                 "The heart is normal in size. The mediastinum is unremarkable. The lungs are "
                 "clear. IMPRESSION: No acute disease.",
                 "The heart is normal in size. The mediastinum is unremarkable. The lungs are "
                 "clear.", "No acute disease.", id="iu-xray"),
    pytest.param("CLINICAL HISTORY: [**Age over 90 **] year old woman with cough FINDINGS: "
                 "Patchy opacity at the right base. CONCLUSION: Possible early pneumonia.",
                 "Patchy opacity at the right base.", "Possible early pneumonia.",
                 id="mimic-iii-conclusion"),
    pytest.param("HISTORY: Shortness of breath FINDINGS: Mild cardiomegaly with small "
                 "bilateral effusions. IMPRESSION: Findings suggest mild CHF.",
                 "Mild cardiomegaly with small bilateral effusions.",
                 "Findings suggest mild CHF.", id="findings-word-in-impression"),
    pytest.param("FINDINGS: Left basal opacity, my impression is atelectasis. IMPRESSION: "
                 "Atelectasis.", "Left basal opacity, my impression is atelectasis.",
                 "Atelectasis.", id="impression-word-in-findings"),
    pytest.param("WET READ: ___ ___ 10:15 PM No pneumothorax. FINDINGS: Right IJ line ends in "
                 "the SVC. No pneumothorax. IMPRESSION: Line in good position.",
                 "Right IJ line ends in the SVC. No pneumothorax.", "Line in good position.",
                 id="wet-read"),
    pytest.param("INDICATION: Eval PNA TECHNIQUE: Portable AP FINDINGS AND IMPRESSION: Stable "
                 "small left effusion. NOTIFICATION: Dr. ___ was paged at 3 PM.",
                 "Stable small left effusion.", "", id="combined-and-notification"),
    pytest.param("INDICATION: Eval PNA FINDINGS: LUNGS: Clear. HEART: Normal size. "
                 "IMPRESSION: Normal.", "LUNGS: Clear. HEART: Normal size.", "Normal.",
                 id="organ-subheaders"),
    pytest.param("FINDINGS: Heart normal. IMPRESSION: No acute process. ADDENDUM: FINDINGS: "
                 "Small nodule at the left apex. IMPRESSION: Recommend CT.",
                 "Heart normal. Small nodule at the left apex.",
                 "No acute process. Recommend CT.", id="addendum"),
    pytest.param("PA AND LATERAL VIEWS OF THE CHEST: FINDINGS: NO INFILTRATE OR EFFUSION. "
                 "IMPRESSION: NORMAL CHEST.", "NO INFILTRATE OR EFFUSION.", "NORMAL CHEST.",
                 id="all-caps"),
    pytest.param("HISTORY: Trauma FINDINGS: No displaced rib fracture. SUMMARY: No fracture. "
                 "RECOMMENDATION(S): Rib films if pain persists.",
                 "No displaced rib fracture.", "No fracture.", id="summary-recommendation"),
    pytest.param("REASON FOR EXAM: r/o pneumo-\nthorax FINDINGS: No pneumo-\nthorax. Well-\n"
                 "defined nodule. IMPRESSION: No pneumothorax.",
                 "No pneumothorax. Well-defined nodule.", "No pneumothorax.",
                 id="hyphenated-line-breaks"),
    pytest.param("FINDINGS: Compared with the PRIOR STUDY: unchanged effusion. IMPRESSION: "
                 "Stable.", "Compared with the PRIOR STUDY: unchanged effusion.", "Stable.",
                 id="prior-study-colon"),
]


@pytest.mark.parametrize("text, findings, impression", FLATTENED)
def test_flattened_reports(text, findings, impression):
    parsed = parse_report(text)
    assert (parsed.findings, parsed.impression, parsed.used_fallback) == (
        findings, impression, False)


# ------------------------------------------------------- de-identification placeholders

# (raw, data.deid "drop", data.deid "token") through clean_section.
PLACEHOLDERS = [
    ("Dr. ___ was notified at ___ on ___.", "Dr. was notified at on.",
     "Dr. xxdeid was notified at xxdeid on xxdeid."),
    ("Compared to ___ ( ___ ), stable.", "Compared to, stable.",
     "Compared to xxdeid (xxdeid), stable."),
    ("___F with cough", "F with cough", "xxdeid F with cough"),
    ("Comparison: XXXX. The XXXX are normal.", "Comparison. The are normal.",
     "Comparison: xxdeid. The xxdeid are normal."),
    ("A xxxx-year-old XxX", "A -year-old", "A xxdeid-year-old xxdeid"),
    ("Xray, 3 x 4 cm, XX, EXXXON, boxxx", "Xray, 3 x 4 cm, XX, EXXXON, boxxx",
     "Xray, 3 x 4 cm, XX, EXXXON, boxxx"),
    ("Seen by [**Last Name (NamePattern4) 123**] on [**2101-10-20**] [**Hospital 1**].",
     "Seen by on.", "Seen by xxdeid on xxdeid."),
    ("Paged [**First Name8 (NamePattern2) **]\n[**Last Name **] at 3 PM.", "Paged at 3 PM.",
     "Paged xxdeid xxdeid at 3 PM."),
    ("___ ___, XXXX", "", ""),
]


@pytest.mark.parametrize("raw, dropped, token", PLACEHOLDERS)
def test_placeholders_dropped_or_made_one_token(raw, dropped, token):
    assert clean_section(raw) == dropped
    assert clean_section(raw, TOKEN) == token


def test_extra_placeholder_pattern():
    text = "Dr. <NAME> and <name>'s nurse XXXX saw <Name>x."
    pattern = r"(?i)<name>"
    assert clean_section(text, Placeholders("token", pattern)) == (
        "Dr. xxdeid and xxdeid's nurse xxdeid saw xxdeid x.")
    assert clean_section(text, Placeholders("drop", pattern)) == "Dr. and 's nurse saw x."
    assert clean_section(text) == "Dr. <NAME> and <name>'s nurse saw <Name>x."


def test_placeholder_rules_are_checked_and_named():
    assert DEID_MODES == config_schema.DEID_MODES
    assert config_schema.defaults("data")["deid"] == Placeholders().mode == "drop"
    assert Placeholders().name == ""
    assert TOKEN.name == "deid-token"
    named = Placeholders("drop", "<name>").name
    assert named.startswith("deid-drop-") and len(named) == len("deid-drop-") + 8
    assert named != Placeholders("drop", "<NAME>").name
    with pytest.raises(ValueError, match="data.deid='mask' is unknown"):
        Placeholders("mask")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        Placeholders("token", "[name")
    with pytest.raises(ValueError, match="matches the empty string"):
        Placeholders("token", "x*")


def test_token_mode_report_and_emptiness():
    parsed = parse_report(MIMIC_REPORT, TOKEN)
    assert "INDICATION: xxdeid F with new onset ascites // eval for infection" in parsed.report
    assert parsed[:2] == parse_report(MIMIC_REPORT)[:2]  # No placeholder in these sections.
    assert clean_report("Seen by XXXX.\n\n\n___", TOKEN) == f"Seen by {DEID_TOKEN}.\n\n{DEID_TOKEN}"
    # Placeholders alone are no model text in either mode: the same reports are bad rows.
    for text in ("FINDINGS: ___\nIMPRESSION: XXXX XXXX.", "XXXX", "INDICATION: x\n\n[**Name**]"):
        assert parse_report(text).is_empty and parse_report(text, TOKEN).is_empty


# ------------------------------------------------------------ hyphenated line breaks

@pytest.mark.parametrize("raw, joined", [
    ("pneumo-\nthorax", "pneumothorax"),
    ("Small pneumo- \n   thorax.", "Small pneumothorax."),
    ("atelec-\ntasis, retro-\ncardiac", "atelectasis, retrocardiac"),
    ("in-\nterstitial, thick-\nening, follow-\ning, end-\notracheal",
     "interstitial, thickening, following, endotracheal"),
    ("well-\ndefined, Ill-\ndefined, x-\nray", "well-defined, Ill-defined, x-ray"),
    ("follow-\nup, cross-\ntable, air-\nfluid", "follow-up, cross-table, air-fluid"),
    ("mild-to-\nmoderate, non-small-\ncell", "mild-to-moderate, non-small-cell"),
    ("2-\n3 cm, T-\ntube, PICC-\nline", "2-3 cm, T-tube, PICC-line"),
    ("Clear -\nno effusion.", "Clear -\nno effusion."),  # A dash, not a broken word.
    ("pneumo-\n\nthorax", "pneumo-\n\nthorax"),  # A paragraph break.
    ("Stable-\nIMPRESSION: B", "Stable-\nIMPRESSION: B"),  # A header may follow.
])
def test_join_hyphenated_lines(raw, joined):
    assert join_hyphenated_lines(raw) == joined


def test_builders_read_data_deid_into_their_config_and_rows(tmp_path):
    import ml_collections
    from fixtures_medical import mimic_tree

    from input_pipeline import csv_manifest, mimic_cxr

    root = tmp_path / "raw"
    mimic_tree(root)
    (root / "a.png").touch()  # Listed only: no image is decoded here.
    (root / "manifest.csv").write_text(
        'image,report,study_id\na.png,"FINDINGS: Seen by XXXX.\nIMPRESSION: ___ normal.",s1\n')

    def data(**fields):
        return ml_collections.ConfigDict(dict(name="x", manual_dir=str(root),
                                              source_max_size=16, **fields))

    rules = [data(), data(deid="token"), data(deid_pattern="<name>")]
    mimic = [mimic_cxr.builder_config(d) for d in rules]
    assert [c.name for c in mimic] == [
        "s16_all", "s16_all_deid-token", f"s16_all_{Placeholders('drop', '<name>').name}"]
    csv = [csv_manifest.builder_config(d) for d in rules]
    assert len({c.name for c in csv}) == 3 and csv[1].name == csv[0].name + "_deid-token"

    def first_row(builder_cls, config, **kwargs):
        builder = builder_cls(config=config, data_dir=str(tmp_path / "tfds"), **kwargs)
        return next(row for rows in builder._source_splits(str(root)).values()
                    for row in rows.rows)

    manifest = str(root / "manifest.csv")
    dropped = first_row(csv_manifest.CsvManifest, csv[0], manifest_path=manifest)
    token = first_row(csv_manifest.CsvManifest, csv[1], manifest_path=manifest)
    assert (dropped.findings, dropped.impression) == ("Seen by.", "normal.")
    assert (token.findings, token.impression) == ("Seen by xxdeid.", "xxdeid normal.")
    mimic_token = first_row(mimic_cxr.MimicCxr, mimic[1])
    assert "INDICATION: xxdeid M with cough" in mimic_token.report
