"""Radiology report text: FINDINGS / IMPRESSION sections, cleaning, sentences.

Pure Python. `parse_report` is what every builder runs on a report:

    sections = parse_report(text)
    sections.findings, sections.impression  # cleaned, one line each, may be ""
    sections.report                         # the whole report, cleaned, headers kept

Headers are recognised case-insensitively, at the start of a line (with or without a
colon, e.g. "FINDINGS:", "Findings:", a bare "Summary" line), or after a sentence's end
or another header when followed by a colon ("... is clear. IMPRESSION: No acute process.",
"ADDENDUM: FINDINGS: ..."). Known headers:

- findings: FINDINGS, FINDING, FINDINGS AND IMPRESSION(S), FINDINGS/IMPRESSION(S)
  (a combined section counts as findings);
- impression: IMPRESSION(S), CONCLUSION(S), SUMMARY, OPINION;
- excluded (never model text): INDICATION, HISTORY, CLINICAL HISTORY, REASON FOR EXAM,
  COMPARISON, TECHNIQUE, EXAMINATION, PROCEDURE, WET READ, NOTIFICATION,
  RECOMMENDATION(S), ADDENDUM, FINAL REPORT and a few more (`_EXCLUDED_HEADERS`).

Any other "WORD:" (e.g. "LUNGS:", "HEART:") is content of the section it sits in. Several
sections of one kind (e.g. an addendum's FINDINGS) are joined in order.

Fallback when a report has neither FINDINGS nor IMPRESSION text (`used_fallback` is
True, the text goes to `findings`):
- no known header at all: the whole report is the findings (free-text reports);
- otherwise: the last paragraph (blank-line separated) that is not empty and does not
  open with an excluded header, the MIMIC-CXR convention for reports whose body follows
  COMPARISON without a header. If there is none, everything is "", and builders skip
  the report as bad.

Cleaning: MIMIC de-identification placeholders ("___") are removed, then the holes they
leave (doubled spaces, " ,", "( )", repeated punctuation, leading punctuation) are closed;
section texts have line breaks and whitespace runs collapsed to single spaces.
"""

from __future__ import annotations

import re
from typing import NamedTuple

FINDINGS, IMPRESSION, EXCLUDED = "findings", "impression", "excluded"
OTHER = "other"  # A capitalised "WORD:" at a line start that is none of the known headers.

_FINDINGS_HEADERS = (
    "findings and impressions", "findings and impression", "findings/impressions",
    "findings/impression", "findings", "finding",
)
_IMPRESSION_HEADERS = (
    "impressions", "impression", "conclusions", "conclusion", "summary", "opinion",
)
_EXCLUDED_HEADERS = (
    "final report", "preliminary report", "examination", "exam", "type of examination",
    "procedure", "indications", "indication", "clinical indication", "reason for exam",
    "reason for examination", "reason for study", "history", "clinical history",
    "clinical information", "clinical details", "clinical notes", "comparisons",
    "comparison", "technique", "wet read", "notification", "recommendations",
    "recommendation", "recommendation(s)", "addendum", "provisional findings impression",
    "provisional findings impression (pfi)", "reference exam", "study", "views",
)
_HEADER_KIND = {
    **{h: FINDINGS for h in _FINDINGS_HEADERS},
    **{h: IMPRESSION for h in _IMPRESSION_HEADERS},
    **{h: EXCLUDED for h in _EXCLUDED_HEADERS},
}


def _names_pattern() -> str:
    # Longest first, so "findings and impression" wins over "findings".
    names = sorted(_HEADER_KIND, key=len, reverse=True)
    return "|".join(re.escape(n).replace(r"\ ", r"[ \t]+") for n in names)


_NAMES = _names_pattern()
# "NAME:" at a line start or right after a sentence's end; content may follow on the line.
_COLON_HEADER = re.compile(rf"(?:^|(?<=[.!?;:]))[ \t]*(?P<name>{_NAMES})[ \t]*:",
                           re.IGNORECASE | re.MULTILINE)
# "NAME" alone on its line (no colon).
_LINE_HEADER = re.compile(rf"^[ \t]*(?P<name>{_NAMES})[ \t]*$", re.IGNORECASE | re.MULTILINE)
# Any capitalised "NAME:" at a line start ("LUNGS:", "HEART:"): only `sections(...,
# other_headers=True)` counts it.
_OTHER_HEADER = re.compile(r"^[ \t]*(?P<name>[A-Z][A-Z /]*[A-Z])[ \t]*:", re.MULTILINE)
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_PLACEHOLDER = re.compile(r"_{2,}")


class Section(NamedTuple):
    """One section of a report: its header's name (lower case), kind and raw text."""

    name: str
    kind: str  # FINDINGS, IMPRESSION, EXCLUDED or OTHER
    text: str


class Sections(NamedTuple):
    """A parsed report: cleaned FINDINGS and IMPRESSION texts and the cleaned whole."""

    findings: str
    impression: str
    report: str
    used_fallback: bool = False

    @property
    def is_empty(self) -> bool:
        """True when there is no model text (builders skip such reports)."""
        return not (self.findings or self.impression)


def parse_report(text: str) -> Sections:
    """Sections of a report (see the module docstring for headers and the fallback)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    report = clean_report(text)
    _, found = sections(text)
    parts = {FINDINGS: [], IMPRESSION: []}
    for section in found:
        if section.kind in parts:
            parts[section.kind].append(section.text)
    findings = clean_section(" ".join(parts[FINDINGS]))
    impression = clean_section(" ".join(parts[IMPRESSION]))
    if findings or impression:
        return Sections(findings, impression, report)
    if not found:
        return Sections(clean_section(text), "", report, used_fallback=True)
    return Sections(_last_body_paragraph(text), "", report, used_fallback=True)


def clean_section(text: str) -> str:
    """One line: placeholders removed, whitespace collapsed, stray punctuation closed."""
    return _clean_line(text, strip_edges=True)


def _clean_line(text: str, *, strip_edges: bool) -> str:
    text = _PLACEHOLDER.sub(" ", text)
    text = " ".join(text.split())
    text = re.sub(r"\(\s*[,;:]?\s*\)", "", text)  # "( )" left by a placeholder.
    text = re.sub(r"\s+([,.;:!?)])", r"\1", text)  # "word ," -> "word,"
    text = re.sub(r"([(])\s+", r"\1", text)
    text = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", text)  # ", ," -> ","
    text = re.sub(r"[,;:]+\s*([.!?])", r"\1", text)  # "word,." -> "word."
    text = re.sub(r"\.(?:\s*\.)+", ".", text)  # ". ." / ".." -> "."
    if strip_edges:  # Leading punctuation, dangling trailing separators.
        text = re.sub(r"^[\s,.;:!?\-]+", "", text)
        text = re.sub(r"[\s,;:\-]+$", "", text)
    return " ".join(text.split())


def clean_report(text: str) -> str:
    """The whole report, lines kept: each line cleaned like a section (its leading and
    trailing punctuation kept), blank-line runs collapsed to one, outer blank lines dropped."""
    text = text.replace("\r\n", "\n")
    lines = [_clean_line(line, strip_edges=False) for line in text.split("\n")]
    out: list[str] = []
    for line in lines:
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip()


_ABBREVIATIONS = frozenset({
    "dr", "mr", "mrs", "ms", "vs", "approx", "e.g", "i.e", "cf", "fig", "st", "incl", "pt",
})
_SENTENCE_END = re.compile(r"[.!?]+(?=\s+|$)")


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`, stripped, in order.

    A sentence ends at ".", "!" or "?" followed by whitespace and then an uppercase
    letter, a digit or an opening bracket/quote, or at the end of the text, and at a
    paragraph break. Decimals ("1.5 cm") never split (no space after the point), nor do
    abbreviations ("Dr. Smith", "approx. 2 cm") or list markers ("1. Normal heart.").
    """
    sentences: list[str] = []
    for paragraph in _PARAGRAPH_BREAK.split(text.replace("\r\n", "\n")):
        paragraph = " ".join(paragraph.split())
        start = 0
        for match in _SENTENCE_END.finditer(paragraph):
            end = match.end()
            rest = paragraph[end:].lstrip()
            if rest and not (rest[0].isupper() or rest[0].isdigit() or rest[0] in "([\"'"):
                continue
            if rest and match.group() == "." and _is_abbreviation_or_marker(
                    paragraph[start:match.start()]):
                continue
            sentence = paragraph[start:end].strip()
            if sentence:
                sentences.append(sentence)
            start = end
        tail = paragraph[start:].strip()
        if tail:
            sentences.append(tail)
    return sentences


def _is_abbreviation_or_marker(before: str) -> bool:
    """Whether the word before a "." is an abbreviation, or the sentence so far is only a
    list marker such as "1" or "(2"."""
    words = before.split()
    if not words:
        return True
    if len(words) == 1 and re.fullmatch(r"\(?\d{1,2}\)?", words[0]):
        return True
    return words[-1].lower().lstrip("(") in _ABBREVIATIONS


def sections(text: str, *, other_headers: bool = False) -> tuple[str, list[Section]]:
    """(the text before the first header, every section in order): each known header
    (see the module docstring) starts one, running to the next header; with
    `other_headers`, any other capitalised "WORD:" at a line start does too (kind OTHER)."""
    headers = _find_headers(text, other_headers)
    if not headers:
        return text, []
    found = [Section(name, kind, text[end:headers[k + 1][0] if k + 1 < len(headers)
                                      else len(text)])
             for k, (_, end, kind, name) in enumerate(headers)]
    return text[:headers[0][0]], found


def _find_headers(text: str, other_headers: bool = False
                  ) -> list[tuple[int, int, str, str]]:
    """(start, end, kind, name) of every header, in order, overlaps resolved."""
    found = []
    for pattern in (_COLON_HEADER, _LINE_HEADER):
        for m in pattern.finditer(text):
            name = " ".join(m.group("name").lower().split())
            found.append((m.start("name"), m.end(), _HEADER_KIND[name], name))
    if other_headers:
        for m in _OTHER_HEADER.finditer(text):
            name = " ".join(m.group("name").lower().split())
            if name not in _HEADER_KIND:
                found.append((m.start("name"), m.end(), OTHER, name))
    found.sort()
    headers: list[tuple[int, int, str, str]] = []
    for header in found:
        if headers and header[0] < headers[-1][1]:
            continue
        headers.append(header)
    return headers


def _last_body_paragraph(text: str) -> str:
    """The last non-empty paragraph not opened by an excluded header (cleaned), or ""."""
    for paragraph in reversed(_PARAGRAPH_BREAK.split(text)):
        if _opens_with_header(paragraph):
            continue
        cleaned = clean_section(paragraph)
        if cleaned:
            return cleaned
    return ""


def _opens_with_header(paragraph: str) -> bool:
    stripped = paragraph.lstrip()
    if not stripped:
        return False
    for pattern in (_COLON_HEADER, _LINE_HEADER):
        m = pattern.match(stripped)
        if m:
            return True
    return False
