"""A rule-based CheXpert-style report labeler, and label vectors written back as text.

`label_report(text)` gives float32 [14] over `CHEXPERT_FINDINGS`: 1 positive, 0 negative,
-1 uncertain, NaN blank (not mentioned). Pure Python (`re` + numpy), no TensorFlow.

How a report is labelled (the CheXpert recipe: mention, classify, aggregate):

1. Sections. When the report has headers ("INDICATION:", "Findings:", a bare "FINDINGS"
   line: `reports.sections`, the builders' parser; any other capitalised "WORD:" at a
   line start also ends a section), the sections that do not describe the image
   (`NON_CLINICAL_SECTIONS`: examination, indication, history, comparison, technique)
   are dropped: "eval for pneumonia" in the indication is a question, not a finding.
2. Clauses. The text is cut into sentences (".", ";", "?", "!", new lines; a period
   between digits stays) and each sentence into clauses at words that end a
   negation's reach ("but", "however", "although", "which", "there is", ...).
3. Mentions. Every finding has phrases and synonyms (`_MENTIONS`): "enlarged cardiac
   silhouette" -> Cardiomegaly, "pleural fluid" -> Pleural Effusion, "vascular
   congestion", "cephalization", "vascular redistribution", "engorged vessels" -> Edema
   (CheXpert counts congestion as edema), "collapse" -> Atelectasis, "PTX" ->
   Pneumothorax; lines, tubes, pacemakers, pacer / monitor / ECG leads and wires,
   sheaths, loop recorders, IVC filters -> Support Devices. Some anatomy is only a
   mention together with a qualifier (`_QUALIFIED`): "heart size is normal" and "the heart
   is not significantly enlarged" are negative Cardiomegaly mentions, "the heart is
   mildly enlarged" a positive one, "heart size is borderline / upper limits (of) normal /
   top-normal / normal to mildly enlarged" an uncertain one; likewise the mediastinum
   (Enlarged Cardiomediastinum) and the costophrenic angles ("blunted" / "sharp": Pleural
   Effusion). The nearest qualifier in the clause counts, the longer one at a tie.
   Two kinds of mention are dropped: an infection named as old disease by the word before
   it ("prior granulomatous infection", "from the prior pneumonia": residue, not
   pneumonia), and a fracture nearer to a device than to a bone ("fractured pacemaker
   lead", "sternal wire is fractured"): a broken device, which makes the device a positive
   mention whatever the clause says of the fracture ("no fracture of the pacemaker leads").
4. Classification of each mention by the cues of its clause (`_CUES`):
   - negation before the mention, reaching to the end of the clause, so that lists are
     covered ("no effusion, consolidation or pneumothorax"): "no", "not", "without",
     "negative for", "free of", "clear of", "absence of", "resolution of", "removal of",
     "resolved";
   - negation after the mention, within a few words: "is not seen", "has resolved",
     "is absent", "removed", "ruled out"; a cue after its mentions reaches back to the
     nearest one and the list it ends ("consolidation, effusion, or pneumothorax is not
     seen": a list needs an "and" / "or"), not to a mention in another phrase;
   - uncertainty before ("possible", "likely", "favored", "suggestive of", "concerning
     for", "borderline", "cannot exclude", "rule out", "limited evaluation for",
     "differential considerations include") or after ("cannot be excluded", "is not
     excluded", "evaluation for X is limited", "cannot be assessed", "is difficult to
     assess", "would be a consideration", "should be considered", "is a possibility",
     "accentuated by AP technique") the mention; "may" / "might" / "could" on either side
     ("a small effusion may be present"), except with an interpreting verb ("may
     represent", "could reflect"), which hedges what follows it and the observation before
     it only when both are the same finding ("opacity may represent atelectasis": a certain
     opacity, an uncertain atelectasis; "blunting may represent effusion": an uncertain
     effusion); "versus" between two mentions;
   - double negation is uncertainty: "cannot be excluded", "not ruled out";
   - pseudo-negations are not negations: "no change in the effusion", "without interval
     change" leave the effusion positive.
   When several cues reach a mention, the nearest one decides.
5. Aggregation per finding over the report (CheXpert order): positive if any mention is
   positive, else uncertain if any is uncertain, else negative if any is negative, else
   blank. "No Finding" is 1 when no finding other than Support Devices is positive or
   uncertain, else blank; an empty report is all blank.

`labels_to_prompt(labels, rng)` goes the other way (CXR-CLIP / MedCLIP "labels as
text"): a report-like text that states the positive findings, negates the negative ones
and hedges the uncertain ones, with randomly chosen templates and synonyms.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
import re
from collections.abc import Iterable, Sequence

import numpy as np

from input_pipeline import reports
from input_pipeline.findings import CHEXPERT_FINDINGS, FINDING_INDEX, NUM_FINDINGS

POSITIVE, NEGATIVE, UNCERTAIN = 1.0, 0.0, -1.0
NO_FINDING = "No Finding"
NOT_PATHOLOGIES = (NO_FINDING, "Support Devices")  # Do not block "No Finding".

# Headers whose sections are dropped. Not "FINAL REPORT": a title line, whose "section"
# (up to the next header) is the report itself when nothing else heads it.
NON_CLINICAL_SECTIONS = (
    "EXAMINATION", "EXAM", "INDICATION", "INDICATIONS", "HISTORY", "CLINICAL HISTORY",
    "CLINICAL INFORMATION", "REASON FOR EXAM", "REASON FOR EXAMINATION", "COMPARISON",
    "COMPARISONS", "TECHNIQUE", "PROCEDURE", "WET READ", "NOTIFICATION",
)

# How many words a negation after the mention may be away ("the pneumothorax previously
# seen at the apex has resolved").
_POST_NEGATION_WORDS = 8
# How many words a qualifier may be away from its anatomy ("the heart size and the
# mediastinal contours are within normal limits").
_QUALIFIER_WORDS = 6

# ------------------------------------------------------------------------------ mentions


def _words(*alternatives: str) -> str:
    return r"\b(?:" + "|".join(alternatives) + r")\b"


_DEVICE_LINE = _words(
    r"(?:central|venous|arterial|picc|midline|ij|internal jugular|subclavian|jugular|"
    r"femoral|dialysis|hemodialysis|swan[- ]?ganz|pulmonary artery|pa|port|infusion) "
    r"(?:venous )?(?:lines?|catheters?)",
)

_MENTIONS: dict[str, str] = {
    "Enlarged Cardiomediastinum": _words(
        r"(?:mediastinal|cardiomediastinal) (?:widening|enlargement)",
        r"widen(?:ed|ing) (?:of the )?(?:superior )?mediastin(?:um|al \w+)",
        r"enlarged cardiomediastin(?:um|al \w+)",
        r"enlarged cardiomediastinum",
    ),
    "Cardiomegaly": _words(
        r"cardiomegaly",
        r"cardiac enlargement",
        r"enlarged (?:heart|cardiac (?:silhouette|shadow|contours?|size))",
        r"enlargement of the (?:heart|cardiac (?:silhouette|shadow))",
    ),
    "Lung Opacity": _words(
        r"opacit(?:y|ies)", r"opacification", r"opacified",
        r"infiltrat(?:e|es|ion|ive)", r"air[- ]?space (?:disease|process)",
        r"ground[- ]glass", r"reticular (?:opacities|markings?|pattern)",
        r"reticulonodular", r"interstitial (?:markings?|opacities|pattern|prominence)",
    ),
    "Lung Lesion": _words(
        r"nodules?", r"nodular (?:opacit(?:y|ies)|densit(?:y|ies)|lesions?)",
        r"mass(?:es)?", r"(?:lung|pulmonary|cavitary) lesions?",
        r"tumou?rs?", r"neoplasms?", r"carcinoma", r"malignancy", r"metastas[ie]s",
    ),
    "Edema": _words(
        r"(?:pulmonary |interstitial |alveolar |perihilar )?edema",
        r"(?:pulmonary )?(?:vascular )?congestion",
        r"(?:congestive )?heart failure", r"chf", r"fluid overload",
        r"kerley b(?:[- ]lines?)?", r"cephali[sz]ation",
        r"(?:(?:pulmonary )?vascular|upper[- ](?:zone|lobe)|cephalad) redistribution",
        r"redistribution of (?:the )?pulmonary (?:blood flow|blood|vasculature|vessels)",
        r"(?:pulmonary )?(?:vascular|venous) engorgement",
        r"engorged (?:pulmonary |central )?(?:vessels|vasculature|vascularity|hila)",
        r"(?:pulmonary )?venous hypertension",
    ),
    "Consolidation": _words(r"consolidat(?:ion|ions|ive|ed)"),
    "Pneumonia": _words(
        r"(?:broncho)?pneumonias?", r"pneumonitis", r"infections?",
        r"infectious (?:process|etiology)",
    ),
    "Atelectasis": _words(
        r"atelecta(?:sis|ses|tic)", r"collapsed?", r"collapse of the \w+(?: \w+)? lobe",
    ),
    "Pneumothorax": _words(r"(?:hydro)?pneumothora(?:x|xes|ces)", r"ptx"),
    "Pleural Effusion": _words(
        r"(?<!pericardial )(?<!joint )effusions?", r"pleural fluid", r"hydrothorax",
        r"hydropneumothorax", r"fluid (?:in|within) the (?:\w+ )?fissure",
    ),
    "Pleural Other": _words(
        r"pleural (?:thickening|plaques?|scarring|calcifications?)", r"fibrothorax",
        r"pleural[- ]based (?:thickening|plaques?)",
    ),
    "Fracture": _words(r"fractur(?:e|es|ed)", r"fx"),
    "Support Devices": "|".join((
        _DEVICE_LINE,
        _words(
            r"(?:endotracheal|et|enteric|nasogastric|ng|orogastric|og|feeding|chest|"
            r"tracheostomy|dobhoff|gastric|nasoenteric) tubes?",
            r"tubes?", r"catheters?", r"picc", r"pacemakers?", r"pacers?", r"aicd", r"icd",
            r"defibrillators?",
            r"leads?(?= (?:in|terminat|project|overl))", r"support(?:ing)? devices?",
            r"monitoring devices?", r"lines and tubes", r"tubes and lines",
            r"(?:sternotomy|sternal|cerclage) wires?", r"stents?", r"drains?",
            r"(?:port-a-cath|portacath)",
            r"(?:cardiac |external |ecg |ekg |telemetry )?monitor(?:ing)? "
            r"(?:leads?|wires?|devices?)",
            r"(?:ecg|ekg|telemetry|epicardial|pacing|pacer|pacemaker|external|cardiac) "
            r"(?:leads?|wires?)",
            r"loop recorders?", r"(?:(?:cordis|introducer|vascular) )?sheaths?",
            r"(?:ivc|vena cava|caval) filters?",
            r"lines(?= (?:and|or) tubes)", r"(?:prosthetic|mechanical) valves?",
            r"(?:valve|valvular) (?:replacement|prosthesis)", r"intra-?aortic balloon pump",
            r"iabp", r"impella",
        ),
    )),
}

# Degree adverbs a negation passes over: "not significantly enlarged" is not enlarged.
_MAGNITUDE = (r"(?:(?:significantly|substantially|appreciably|grossly|markedly|definitely|"
              r"clearly|overtly|particularly|much|meaningfully) )?")

# Anatomy that is a mention only with a qualifier (nearest one in the clause).
_QUALIFIED: dict[str, tuple[str, dict[float, str]]] = {
    "Cardiomegaly": (
        _words(r"heart size", r"size of the heart", r"heart(?! failure| borders?)",
               r"cardiac (?:silhouette|size|shadow|contours?)"),
        {
            NEGATIVE: _words(r"normal(?: in size)?", r"within normal limits",
                             r"unremarkable", rf"not (?:be )?{_MAGNITUDE}(?:enlarged|increased)"),
            UNCERTAIN: _words(r"borderline(?: enlarged| in size)?",
                              r"(?:top|upper|high)[- ]normal",
                              r"(?:at )?(?:the )?upper (?:limits?|range|end) (?:of )?normal",
                              r"normal to (?:slightly |mildly |minimally )?(?:enlarged|large)"),
            POSITIVE: _words(r"enlarged", r"enlargement", r"large", r"increased",
                             r"prominent", r"globular"),
        },
    ),
    "Enlarged Cardiomediastinum": (
        _words(r"mediastinum", r"cardiomediastinum",
               r"(?:cardio)?mediastinal (?:silhouette|contours?|width|structures|shadow)"),
        {
            NEGATIVE: _words(r"normal(?: in size| in contour)?", r"within normal limits",
                             r"unremarkable", rf"not (?:be )?{_MAGNITUDE}(?:widened|enlarged)"),
            UNCERTAIN: _words(r"borderline"),
            POSITIVE: _words(r"widened", r"widening", r"enlarged", r"enlargement",
                             r"prominent", r"prominence"),
        },
    ),
    "Pleural Effusion": (
        _words(r"costophrenic (?:angles?|sulc(?:us|i))"),
        {
            NEGATIVE: _words(r"sharp(?:ly defined)?", r"clear", r"preserved", r"normal"),
            UNCERTAIN: _words(r"(?:minimal|mild|slight) blunting"),
            POSITIVE: _words(r"blunt(?:ed|ing)?", r"obliterat(?:ed|ion)"),
        },
    ),
}

# ---------------------------------------------------------------------------------- cues

# Ordered: at one position the first alternative wins, so the double negations and
# pseudo-negations come before the plain negations they contain.
_CUES: tuple[tuple[str, str], ...] = (
    ("pseudo", _words(
        r"no (?:(?:significant|substantial|appreciable|definite|interval|notable|"
        r"major|overall) )*(?:change|increase|decrease|improvement|worsening|progression)",
        r"without (?:(?:significant|substantial|appreciable|interval|notable) )*change",
        r"not (?:significantly )?changed", r"gram[- ]negative",
    )),
    ("uncertain_after", _words(
        r"(?:can ?not|could not|cannot) be (?:entirely |completely |totally |well |fully )?"
        r"(?:excluded|ruled out|eliminated|assessed|evaluated)",
        r"(?:is|are|was|were)? ?not (?:be )?(?:entirely |completely )?(?:excluded|ruled out)",
        r"(?:is |are )?difficult to (?:exclude|rule out|assess|evaluate|see)",
        # Limited evaluation: "evaluation for pneumothorax is limited".
        r"(?:is|are|was|were) (?:somewhat |severely |markedly )?limited(?! to\b)",
        # A diagnosis considered: "pneumonia would be a consideration".
        r"(?:should|could|would|may|might|is|are|must) (?:also )?be considered",
        r"(?:is|are|would be|remains?|could be) (?:also )?(?:a |an )?(?:important |"
        r"diagnostic |differential |clinical )?considerations?",
        # An appearance a technique may create: "cardiac silhouette, likely accentuated by
        # AP technique".
        r"(?:(?:likely|possibly|probably|partly|partially|in part|at least in part) )?"
        r"(?:(?:accentuated|exaggerated|magnified) by|(?:due to|related to) (?:the )?"
        r"(?:low lung volumes?|(?:ap |portable |supine |semi-?upright )?(?:technique|"
        r"projection|positioning)|(?:patient )?rotation))",
        r"(?:is|are|remains?) (?:also )?(?:a |an )?(?:possibility|possible)",
    )),
    # A modal and an interpreting verb: the mentions after it are hedged, the observation
    # before it only when it is the same finding ("opacity may represent airspace disease"
    # is an uncertain opacity, "opacity may represent atelectasis" a certain one).
    ("uncertain_interpretation", _words(
        r"(?:may|might|could|can) (?:also |possibly |potentially )?(?:represent|reflect|"
        r"indicate|be due to|relate to|be related to|correspond to|be secondary to|"
        r"be caused by|signify|be compatible with|be consistent with)",
    )),
    ("uncertain_before", _words(
        r"(?:can ?not|could not|cannot|can't) (?:entirely |completely )?"
        r"(?:exclude|rule out|eliminate)",
        r"limit(?:s|ing|ed)? (?:the )?(?:evaluation|assessment|exam|examination) (?:of|for)",
        r"not (?:well |optimally |adequately )?(?:evaluated|assessed|visualized) for",
        r"differential (?:diagnos[ie]s |considerations? )?(?:include|includes|of)",
        r"considerations? (?:include|includes)", r"favou?r(?:s|ed|ing)?",
        r"possible", r"possibly", r"probable", r"probably", r"likely", r"presumed",
        r"presumably", r"suspected", r"suspect", r"suspicious (?:for|of)",
        r"suggest(?:s|ed|ing|ive of)?", r"concern(?:ing)? for", r"worrisome for",
        r"question of", r"questionabl[ey]", r"equivocal", r"borderline", r"indeterminate",
        r"(?:to )?rule out", r"r/o", r"(?:evaluate|assess) for", r"differential",
        r"raising the possibility", r"raises the possibility", r"perhaps",
        r"consider(?:ed)?", r"to exclude", r"to indicate",
        r"correlat\w* (?:clinically )?for",
    )),
    # Modal hedges reach both sides: "blunting may represent effusion", "opacity is
    # likely atelectasis".
    ("uncertain_both", _words(
        r"may", r"might", r"could",
        r"(?:is|are) (?:likely|possible|probable|suspected|questioned|favou?red|"
        r"considered|questionable|a consideration)",
    )),
    ("versus", _words(r"versus", r"vs")),
    ("negated_after", _words(
        r"(?:(?:is|are|was|were|has been|have been) )?(?:not|no longer) (?:been )?"
        r"(?:seen|identified|present|visualized|visualised|appreciated|demonstrated|"
        r"evident|visible|detected|noted|apparent|observed)",
        r"(?:(?:has|have|had) (?:since |now |completely |nearly |largely )?|(?:is|are) "
        r"(?:now )?)(?:resolved|cleared)",
        r"(?:is|are|was|were)? ?absent",
        r"(?:(?:has|have) been |was |were )?removed", r"(?:(?:has|have) been )?ruled out",
        r"(?:(?:has|have) been |was |is )?excluded",
    )),
    # "Resolved pneumonia", "the pneumothorax resolved".
    ("negated_both", _words(r"resolved", r"cleared")),
    ("negated_before", _words(
        r"no", r"not", r"without", r"negative for", r"free of", r"clear of",
        r"absen(?:ce|t) of", r"(?:interval )?resolution of", r"(?:interval )?removal of",
        r"no longer", r"neither", r"nor", r"rather than",
    )),
)

_LIST_JOIN = re.compile(r"(?:,? (?P<conjunction>and|or|and/or|nor) |, )(?:[\w-]+ ){0,3}")
_NEGATED_VERB = re.compile(r"(?:to )?(?:suggest|indicate)|suggest(?:s|ing|ive of)")
_CUE_PATTERN = re.compile("|".join(f"(?P<{name}>{regex})" for name, regex in _CUES))

# Words that end the reach of a cue inside a sentence.
_CLAUSE_BREAK = re.compile(
    r",? \b(?:but|however|although|though|whereas|while|which|that|except|aside from|"
    r"apart from|other than|otherwise|with the exception of)\b"
    r"|,? \b(?:there (?:is|are|has been|have been)|this is|these are)\b"
)
# Where a cue's reach ends: . ; ? ! and new lines (a period between digits is a decimal
# point). More breaks than the sentences of `reports.split_sentences` on purpose: a
# negation must not reach into the next sentence when that one starts in lower case or
# follows without a space ("No effusion. cardiomegaly is present.").
_SCOPE_END = re.compile(r"(?<!\d)\.|\.(?!\d)|[;?!\n]")

# An infection named as old disease by the word before it.
_OLD_DISEASE = re.compile(r"\b(?:prior|previous|old|remote|healed|past|former|treated|"
                          r"granulomatous|tuberculous|histoplasmosis) $")
_BONE = re.compile(_words(
    r"ribs?", r"clavic(?:le|ular)", r"scapula(?:r)?", r"humer(?:us|al)", r"vertebra[el]?",
    r"spine", r"spinal", r"sternum", r"acromi(?:on|al)", r"bones?", r"osseous",
))
# How many words a fracture may be from a device to be the device's ("fracture of the
# right ventricular pacing lead").
_DEVICE_FRACTURE_WORDS = 4

_COMPILED_MENTIONS = {name: re.compile(regex) for name, regex in _MENTIONS.items()}
_COMPILED_QUALIFIED = {
    name: (re.compile(subject), {value: re.compile(q) for value, q in qualifiers.items()})
    for name, (subject, qualifiers) in _QUALIFIED.items()
}


@dataclasses.dataclass(frozen=True)
class Mention:
    """One finding mention in a clause and what the clause says about it."""

    finding: str
    start: int
    end: int
    value: float  # POSITIVE / NEGATIVE / UNCERTAIN
    clause: str


def clinical_text(report: str) -> str:
    """The report without the sections that do not describe the image (headers found by
    `reports.sections`; any capitalised "WORD:" at a line start also ends a section)."""
    preamble, found = reports.sections(report, other_headers=True)
    if not found:
        return report
    return "\n".join([preamble] + [s.text for s in found
                                    if s.name.upper() not in NON_CLINICAL_SECTIONS])


def clauses(text: str) -> list[str]:
    """Lower-cased clauses: sentences cut at the words that end a negation's reach."""
    text = text.lower().replace("\u2019", "'")
    text = re.sub(r"\bvs\.", "versus", text)
    text = re.sub(r"\s*-\s*(?=\w)", "-", text)  # "top - normal" -> "top-normal"
    result = []
    for sentence in _SCOPE_END.split(text):
        sentence = " ".join(sentence.split())
        start = 0
        for cut in _CLAUSE_BREAK.finditer(sentence):
            result.append(sentence[start:cut.start()])
            start = cut.start()
        result.append(sentence[start:])
    return [c.strip(" ,:") for c in result if c.strip(" ,:")]


def _word_gap(clause: str, start: int, end: int) -> int:
    return len(clause[start:end].split())


def _reaches_back(clause: str, start: int, end: int, cue_start: int, mention_spans) -> bool:
    """Does a cue after the mention [start, end) reach it?

    It reaches the nearest mention before it (within a few words), and the mentions
    joined to that one in a list ("effusion and pneumothorax have resolved",
    "consolidation, effusion, or pneumothorax is not seen"), but not one in another phrase
    ("effusions with atelectasis, infection not excluded"): a list needs "and" / "or"
    somewhere, commas alone do not make one.
    """
    between = sorted({(s, e) for s, e in mention_spans if s >= end and e <= cue_start})
    last, conjunction = end, False
    for s, e in between:
        join = _LIST_JOIN.fullmatch(clause[last:s])
        if not join:
            return False
        conjunction = conjunction or bool(join.group("conjunction"))
        last = e
    return (conjunction or not between) and (
        _word_gap(clause, last, cue_start) <= _POST_NEGATION_WORDS)


def _classify(clause: str, name: str, start: int, end: int, cues, found) -> float | None:
    """The value the nearest applicable cue gives the mention `name` at [start, end), or
    None. `found` holds every (finding, start, end) of the clause."""
    spans = [(s, e) for _, s, e in found]
    best: tuple[int, float] | None = None

    def offer(distance: int, value: float) -> None:
        nonlocal best
        if best is None or distance < best[0]:
            best = (distance, value)

    for kind, cue_start, cue_end in cues:
        before = cue_end <= start
        after = cue_start >= end
        if not (before or after):
            continue
        distance = start - cue_end if before else cue_start - end
        if kind in ("negated_before", "negated_both") and before:
            offer(distance, NEGATIVE)
        elif kind in ("negated_after", "negated_both") and after:
            if _reaches_back(clause, start, end, cue_start, spans):
                offer(distance, NEGATIVE)
        elif kind == "uncertain_before" and before:
            offer(distance, UNCERTAIN)
        elif kind == "uncertain_after" and after:
            if _reaches_back(clause, start, end, cue_start, spans):
                offer(distance, UNCERTAIN)
        elif kind == "uncertain_interpretation":
            # After the mention only when the interpretation names the same finding.
            if before or any(n == name and s >= cue_end for n, s, _ in found):
                offer(distance, UNCERTAIN)
        elif kind == "uncertain_both":
            offer(distance, UNCERTAIN)
        elif kind == "versus":
            # Only the mentions right beside "versus" (no other mention in between).
            lo, hi = (end, cue_start) if before else (cue_end, start)
            if not any(lo <= s and e <= hi for s, e in spans):
                offer(distance, UNCERTAIN)
    return None if best is None else best[1]


def _nearest_qualifier(clause: str, start: int, end: int, qualifiers) -> float | None:
    """The value of the qualifier nearest to the subject [start, end), within a few words."""
    best: tuple[int, float] | None = None
    for value, pattern in qualifiers.items():
        for match in pattern.finditer(clause):
            if match.start() < end and match.end() > start:
                continue
            before = match.end() <= start
            gap = clause[match.end():start] if before else clause[end:match.start()]
            if len(gap.split()) > _QUALIFIER_WORDS:
                continue
            # At equal distance the longer qualifier wins: "normal to slightly enlarged"
            # over "normal".
            key = (len(gap), -(match.end() - match.start()))
            if best is None or key < best[0]:
                best = (key, value)
    return None if best is None else best[1]


def _raw_matches(clauses_: Sequence[str]) -> list[tuple[list, list, list]]:
    """Per clause: (cues, mentions, qualified subjects) as (name, start, end) in the
    clause. Each pattern runs once over the clauses joined by new lines, which no pattern
    crosses: 18 regex scans per report rather than per clause."""
    text = "\n".join(clauses_)
    starts = list(itertools.accumulate((len(c) + 1 for c in clauses_[:-1]), initial=0))
    per_clause = [([], [], []) for _ in clauses_]

    def add(kind: int, name: str, match: re.Match) -> None:
        index = bisect.bisect_right(starts, match.start()) - 1
        offset = starts[index]
        per_clause[index][kind].append((name, match.start() - offset, match.end() - offset))

    for match in _CUE_PATTERN.finditer(text):
        add(0, match.lastgroup, match)
    for name, pattern in _COMPILED_MENTIONS.items():
        for match in pattern.finditer(text):
            add(1, name, match)
    for name, (subject, _) in _COMPILED_QUALIFIED.items():
        for match in subject.finditer(text):
            add(2, name, match)
    return per_clause


def clause_mentions(clause: str, raw: tuple[list, list, list] | None = None) -> list[Mention]:
    """Every finding mention of one lower-cased clause with its value (`raw`: the
    clause's matches from `_raw_matches`, found here when not given)."""
    raw_cues, raw_mentions, raw_subjects = raw or _raw_matches([clause])[0]
    cues = [c for c in raw_cues if c[0] != "pseudo"]
    # "No new consolidation to suggest pneumonia": a negation carries over "suggest".
    cues = [
        ("negated_before", s, e)
        if kind == "uncertain_before" and _NEGATED_VERB.fullmatch(clause[s:e])
        and any(k == "negated_before" and ce <= s for k, _, ce in cues)
        else (kind, s, e)
        for kind, s, e in cues
    ]
    found: list[tuple[str, int, int, float | None]] = [(*m, None) for m in raw_mentions]
    for name, start, end in raw_subjects:
        if any(n == name and s <= start < e for n, s, e, _ in found):
            continue  # Already inside a full mention ("enlarged cardiac silhouette").
        value = _nearest_qualifier(clause, start, end, _COMPILED_QUALIFIED[name][1])
        if value is not None:
            found.append((name, start, end, value))
    found = _without_old_disease(clause, found)
    found, devices_present = _device_fractures(clause, found)
    spans = [(n, s, e) for n, s, e, _ in found]
    hedges = [c for c in cues if c[0].startswith("uncertain")]
    mentions = []
    for name, start, end, qualified in found:
        if (start, end) in devices_present:
            value = POSITIVE  # A broken lead is there: the cues are the fracture's.
        elif qualified is None:
            value = _classify(clause, name, start, end, cues, spans)
        elif qualified == POSITIVE:
            # The qualifier carries the negation ("not enlarged" is a negative qualifier),
            # so only hedges change it: "the heart is possibly enlarged".
            value = _classify(clause, name, start, end, hedges, spans)
        else:
            value = qualified
        if value is None:
            value = POSITIVE if qualified is None else qualified
        mentions.append(Mention(name, start, end, value, clause))
    return mentions


def _without_old_disease(clause: str, found: list) -> list:
    """Drops infection mentions that name old disease ("prior granulomatous infection",
    "scarring from the prior pneumonia"): a residue, not active pneumonia."""
    return [m for m in found
            if not (m[0] == "Pneumonia" and _OLD_DISEASE.search(clause, 0, m[1]))]


def _device_fractures(clause: str, found: list) -> tuple[list, set]:
    """(mentions without device fractures, spans of the devices they belong to).

    A fracture whose nearest neighbour within a few words is a device mention rather than
    a bone ("fractured pacemaker lead", "sternal wire is fractured", "no fracture of the
    pacemaker leads") is a broken device, not a Fracture; that device is present
    whatever the clause says of the fracture.
    """
    devices = [(s, e) for n, s, e, _ in found if n == "Support Devices"]
    if not devices:
        return found, set()
    bones = [(m.start(), m.end()) for m in _BONE.finditer(clause)]
    kept, present = [], set()
    for mention in found:
        name, start, end, _ = mention
        if name == "Fracture":
            near = [d for d in devices if _gap(clause, d, (start, end)) <= _DEVICE_FRACTURE_WORDS
                    and not _LIST_JOIN.fullmatch(_between(clause, d, (start, end)))]
            nearest_bone = min((_gap(clause, b, (start, end)) for b in bones), default=None)
            if near and (nearest_bone is None
                         or min(_gap(clause, d, (start, end)) for d in near) < nearest_bone):
                present.update(near)
                continue
        kept.append(mention)
    return kept, present


def _between(clause: str, a: tuple[int, int], b: tuple[int, int]) -> str:
    """The text between two spans that do not overlap."""
    return clause[a[1]:b[0]] if a[1] <= b[0] else clause[b[1]:a[0]]


def _gap(clause: str, a: tuple[int, int], b: tuple[int, int]) -> int:
    """Words between two spans that do not overlap."""
    return len(_between(clause, a, b).split())


def report_mentions(report: str) -> list[Mention]:
    """All mentions of the clinical sections of a report, in order."""
    return _mentions(clinical_text(report))


def _mentions(clinical: str) -> list[Mention]:
    found = clauses(clinical)
    if not found:
        return []
    return [m for clause, raw in zip(found, _raw_matches(found), strict=True)
            for m in clause_mentions(clause, raw)]


def aggregate(mentions: Iterable[Mention], has_text: bool = True) -> np.ndarray:
    """CheXpert aggregation of mention values into float32 [14] (see the module doc)."""
    labels = np.full(NUM_FINDINGS, np.nan, dtype=np.float32)
    if not has_text:
        return labels
    rank = {POSITIVE: 3, UNCERTAIN: 2, NEGATIVE: 1}
    for mention in mentions:
        index = FINDING_INDEX[mention.finding]
        old = labels[index]
        if np.isnan(old) or rank[mention.value] > rank[float(old)]:
            labels[index] = mention.value
    blocking = [FINDING_INDEX[n] for n in CHEXPERT_FINDINGS if n not in NOT_PATHOLOGIES]
    values = labels[blocking]
    if not np.any((values == POSITIVE) | (values == UNCERTAIN)):
        labels[FINDING_INDEX[NO_FINDING]] = POSITIVE
    return labels


def label_report(text: str) -> np.ndarray:
    """float32 [14] CheXpert-style labels of one report: 1 / 0 / -1 / NaN (blank)."""
    clinical = clinical_text(text)
    return aggregate(_mentions(clinical), has_text=bool(re.search(r"\w", clinical)))


def label_reports(texts: Iterable[str]) -> np.ndarray:
    """float32 [N, 14] labels of N reports (rows as `label_report`)."""
    rows = [label_report(t) for t in texts]
    if not rows:
        return np.zeros((0, NUM_FINDINGS), dtype=np.float32)
    return np.stack(rows).astype(np.float32)


# ------------------------------------------------------------------- labels -> prompt text


@dataclasses.dataclass(frozen=True)
class PromptTemplates:
    """Sentence templates of `labels_to_prompt`; `{finding}` is a finding phrase,
    `{findings}` a list ("a, b or c")."""

    positive: tuple[str, ...] = (
        "{finding}.", "there is {finding}.", "findings consistent with {finding}.",
        "{finding} is present.",
    )
    negative: tuple[str, ...] = ("no {finding}.", "there is no {finding}.",
                                 "no evidence of {finding}.")
    negative_list: tuple[str, ...] = ("no {findings}.", "there is no {findings}.",
                                      "no evidence of {findings}.")
    uncertain: tuple[str, ...] = ("possible {finding}.", "{finding} cannot be excluded.",
                                  "findings may represent {finding}.",
                                  "findings suggestive of {finding}.")
    no_finding: tuple[str, ...] = ("no acute cardiopulmonary process.",
                                   "no acute cardiopulmonary abnormality.",
                                   "no acute intrathoracic process.")


DEFAULT_PROMPT_TEMPLATES = PromptTemplates()

# Phrases the labeler reads back as the same finding (the first is the plain name).
PROMPT_PHRASES: dict[str, tuple[str, ...]] = {
    "Enlarged Cardiomediastinum": ("widened mediastinum", "mediastinal widening",
                                   "enlarged cardiomediastinum"),
    "Cardiomegaly": ("cardiomegaly", "enlarged cardiac silhouette", "cardiac enlargement"),
    "Lung Opacity": ("lung opacity", "airspace opacity", "airspace disease"),
    "Lung Lesion": ("pulmonary nodule", "lung mass", "lung lesion"),
    "Edema": ("pulmonary edema", "interstitial edema", "pulmonary vascular congestion"),
    "Consolidation": ("consolidation", "focal consolidation"),
    "Pneumonia": ("pneumonia",),
    "Atelectasis": ("atelectasis", "bibasilar atelectasis"),
    "Pneumothorax": ("pneumothorax",),
    "Pleural Effusion": ("pleural effusion", "pleural fluid"),
    "Pleural Other": ("pleural thickening", "pleural plaque"),
    "Fracture": ("fracture", "rib fracture"),
    "Support Devices": ("support devices", "lines and tubes"),
}


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def labels_to_prompt(
    labels: Sequence[float] | np.ndarray,
    rng: np.random.Generator | int | None = None,
    templates: PromptTemplates = DEFAULT_PROMPT_TEMPLATES,
) -> str:
    """A report-like text of a CheXpert label vector (order of `CHEXPERT_FINDINGS`).

    Positive findings are stated, uncertain ones hedged ("possible X"), negative ones
    negated, one by one or as a list ("no X, Y or Z"); blank (NaN) findings are left out.
    "No Finding" = 1 adds a normal impression ("no acute cardiopulmonary process").
    Templates, synonyms and sentence order are drawn from `rng` (a Generator or a seed).
    """
    labels = np.asarray(labels, dtype=np.float32)
    if labels.shape != (NUM_FINDINGS,):
        raise ValueError(f"labels must be float [{NUM_FINDINGS}] over CHEXPERT_FINDINGS; "
                         f"got shape {labels.shape}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    pick = lambda options: options[int(rng.integers(len(options)))]
    stated, negated = [], []
    for name, value in zip(CHEXPERT_FINDINGS, labels.tolist(), strict=True):
        if name == NO_FINDING or math.isnan(value):
            continue
        phrase = pick(PROMPT_PHRASES[name])
        if value == POSITIVE:
            stated.append(pick(templates.positive).format(finding=phrase))
        elif value == UNCERTAIN:
            stated.append(pick(templates.uncertain).format(finding=phrase))
        elif value == NEGATIVE:
            negated.append(phrase)
        else:
            raise ValueError(f"label {value} of {name!r} is not 1, 0, -1 or NaN")
    order = rng.permutation(len(stated))
    sentences = [stated[i] for i in order]
    negated = [negated[i] for i in rng.permutation(len(negated))]
    if negated and (len(negated) == 1 or rng.random() < 0.5):
        sentences += [pick(templates.negative).format(finding=p) for p in negated]
    elif negated:
        sentences.append(pick(templates.negative_list).format(findings=_join(negated)))
    if labels[FINDING_INDEX[NO_FINDING]] == POSITIVE:
        sentences.append(pick(templates.no_finding))
    return " ".join(s[:1].upper() + s[1:] for s in sentences)
