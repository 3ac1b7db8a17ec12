"""Radiology report text: FINDINGS / IMPRESSION sections, cleaning, sentences.

Pure Python. `parse_report` is what every builder runs on a report:

    sections = parse_report(text, Placeholders("drop"))   # data.deid, data.deid_pattern
    sections.findings, sections.impression  # cleaned, one line each, may be ""
    sections.report                         # the whole report, cleaned, headers kept

Headers are recognised

- case-insensitively at the start of a line, with or without a colon ("FINDINGS:",
  "Findings:", a bare "Summary" line);
- case-insensitively after a sentence's end or another header when followed by a colon
  ("... is clear. Impression: No acute process.", "ADDENDUM: FINDINGS: ...");
- in UPPER CASE after any whitespace when followed by a colon, so that flattened reports
  split: "INDICATION: Cough FINDINGS: Heart size normal. IMPRESSION: Normal." (except
  STUDY, VIEWS and EXAM, which end ordinary phrases such as "PA AND LATERAL VIEWS:").
  Mixed- or lower-case words mid-sentence are prose ("the findings: ..." is not cut),
  and so is a header without a colon mid-line.

Known headers:

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

Before the sections are found:

1. Hyphenated line breaks are joined. A line ending in a hyphen right after a letter or
   digit, whose next line starts with a lowercase letter or a digit, is one word: the
   line break goes. The hyphen goes too when it sits between two lowercase letters
   (a word broken by the typesetter: "pneumo-\\nthorax" -> "pneumothorax",
   "in-\\nterstitial" -> "interstitial"), unless the parts look like a compound's: the
   part before is a word that begins compounds (`_COMPOUND_FIRST_WORDS`: well, ill, left,
   right, ground, x, self, ...: "well-\\ndefined" -> "well-defined"), the word after is
   one that ends them (`_COMPOUND_LAST_WORDS`: up, defined, sided, glass, ...:
   "follow-\\nup" -> "follow-up"), or the part before is itself joined by a hyphen
   ("mild-to-\\nmoderate" -> "mild-to-moderate"). Digits keep it ("2-\\n3 cm" ->
   "2-3 cm"), as do upper-case letters ("T-\\ntube" -> "T-tube").
2. De-identification placeholders are found: MIMIC-CXR's "___" (two or more
   underscores), IU X-ray / OpenI's "XXXX" (a whole word of three or more X, either
   case), MIMIC-II/III's "[** ... **]" (anything but brackets inside, e.g.
   "[**Hospital 123**]", "[**2101-10-20**]"), and the matches of an extra regex
   (`data.deid_pattern`; it may set its own flags, e.g. "(?i)\\[name\\]"). Placeholders
   separated only by spaces or tabs are one run. By `data.deid`:
   - "drop" (default): removed; the holes they leave are closed in cleaning;
   - "token": each run becomes `DEID_TOKEN`, "xxdeid" (set apart by a space where it
     would touch a letter or digit: "___F" -> "xxdeid F"). Lower-case ASCII letters
     only, so `normalize_text` leaves it unchanged and SentencePiece (which splits at
     spaces and script changes, never inside a run of letters) sees the same whole word
     every time and learns it as one piece; the "xx" prefix (after fastai's xxunk,
     xxbos) keeps it from being a real word.
   A section whose only words are placeholders is empty in either mode.

Cleaning: the holes placeholders leave (doubled spaces, " ,", "( )", repeated
punctuation, leading punctuation) are closed; section texts have line breaks and
whitespace runs collapsed to single spaces.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
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
# Words that end ordinary upper-case phrases ("PA AND LATERAL VIEWS:", "PRIOR STUDY:"):
# headers only where the case-insensitive rules find them.
_NOT_MID_LINE = frozenset({"study", "views", "exam"})


def _names_pattern(names) -> str:
    # Longest first, so "findings and impression" wins over "findings".
    names = sorted(names, key=len, reverse=True)
    return "|".join(re.escape(n).replace(r"\ ", r"[ \t]+") for n in names)


_NAMES = _names_pattern(_HEADER_KIND)
# "NAME:" at a line start or right after a sentence's end; content may follow on the line.
_COLON_HEADER = re.compile(rf"(?:^|(?<=[.!?;:]))[ \t]*(?P<name>{_NAMES})[ \t]*:",
                           re.IGNORECASE | re.MULTILINE)
# "NAME:" in upper case after any whitespace (flattened reports). Case-sensitive.
_UPPER_NAMES = _names_pattern(n.upper() for n in _HEADER_KIND if n not in _NOT_MID_LINE)
_MID_LINE_HEADER = re.compile(rf"(?<=\s)(?P<name>{_UPPER_NAMES})[ \t]*:")
# "NAME" alone on its line (no colon).
_LINE_HEADER = re.compile(rf"^[ \t]*(?P<name>{_NAMES})[ \t]*$", re.IGNORECASE | re.MULTILINE)
# Any capitalised "NAME:" at a line start ("LUNGS:", "HEART:"): only `sections(...,
# other_headers=True)` counts it.
_OTHER_HEADER = re.compile(r"^[ \t]*(?P<name>[A-Z][A-Z /]*[A-Z])[ \t]*:", re.MULTILINE)
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")

# A hyphen at a line end between lowercase letters stays where it looks like a compound's:
# after a word that begins compounds, before one that ends them. Words that also begin
# many single words ("in-terstitial", "thick-ening", "follow-ing", "end-otracheal") are in
# neither list: the broken word is the likelier reading.
_COMPOUND_FIRST_WORDS = frozenset({
    "well", "ill", "left", "right", "ground", "x", "self", "single", "double", "dual",
    "two", "three",
})
_COMPOUND_LAST_WORDS = frozenset({
    "up", "defined", "sided", "appearing", "filled", "like", "shaped", "type", "term",
    "table", "glass", "fluid", "lumen", "chamber", "guided", "related", "based", "weighted",
    "enhanced",
})
_LINE_END_HYPHEN = re.compile(
    r"(?P<word>[A-Za-z0-9]+)-[ \t]*\n[ \t]*(?=(?P<next>[a-z0-9][A-Za-z0-9]*))")

DEID_MODES = ("drop", "token")  # config_schema.DEID_MODES
DEID_TOKEN = "xxdeid"
_PLACEHOLDER = (r"_{2,}"  # MIMIC-CXR
                r"|(?<![A-Za-z0-9])[Xx]{3,}(?![A-Za-z0-9])"  # IU X-ray / OpenI
                r"|\[\*\*[^\[\]]*\*\*\]")  # MIMIC-II/III
_PLACEHOLDER_RUN = re.compile(rf"(?:{_PLACEHOLDER})(?:[ \t]*(?:{_PLACEHOLDER}))*")


@dataclasses.dataclass(frozen=True)
class Placeholders:
    """What becomes of de-identification placeholders (`data.deid`, `data.deid_pattern`;
    see the module docstring): "drop" removes them, "token" writes `DEID_TOKEN`."""

    mode: str = "drop"
    pattern: str | None = None  # An extra regex; its matches are placeholders too.

    def __post_init__(self):
        if self.mode not in DEID_MODES:
            raise ValueError(f"data.deid={self.mode!r} is unknown; choose one of "
                             f"{list(DEID_MODES)}")
        if self.pattern is not None:
            _extra_placeholder(self.pattern)  # Checked now, not at the first report.

    @property
    def name(self) -> str:
        """"" for the default; else a tag for builder config names, e.g. "deid-token",
        "deid-drop-1f2e3d4c" (the extra pattern as a hash), so that records cleaned
        differently never share a directory."""
        if self.mode == "drop" and not self.pattern:
            return ""
        tag = f"deid-{self.mode}"
        if self.pattern:
            tag += "-" + hashlib.sha256(self.pattern.encode()).hexdigest()[:8]
        return tag

    def apply(self, text: str) -> str:
        """`text` with every placeholder run removed (drop) or made `DEID_TOKEN` (token)."""
        if self.pattern:
            # Matches become MIMIC's "___", so they join runs like the built-in kinds.
            text = _extra_placeholder(self.pattern).sub(
                lambda m: "___" if m.group() else "", text)
        if self.mode == "drop":
            return _PLACEHOLDER_RUN.sub(" ", text)
        return _PLACEHOLDER_RUN.sub(_token, text)


def _token(match: re.Match) -> str:
    """`DEID_TOKEN`, with a space on each side where it would touch a letter or digit
    ("___F" -> "xxdeid F"), none next to punctuation ("XXXX-year-old", "(___)")."""
    text, start, end = match.string, match.start(), match.end()
    before = " " if start > 0 and text[start - 1].isalnum() else ""
    after = " " if end < len(text) and text[end].isalnum() else ""
    return f"{before}{DEID_TOKEN}{after}"


@functools.lru_cache(maxsize=16)
def _extra_placeholder(pattern: str) -> re.Pattern:
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"data.deid_pattern={pattern!r} is not a valid regular "
                         f"expression: {e}") from None
    if regex.fullmatch(""):
        raise ValueError(f"data.deid_pattern={pattern!r} matches the empty string; it must "
                         "match only the placeholders themselves")
    return regex


DEFAULT_PLACEHOLDERS = Placeholders()


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


def parse_report(text: str, placeholders: Placeholders = DEFAULT_PLACEHOLDERS) -> Sections:
    """Sections of a report (see the module docstring for headers, placeholders and the
    fallback)."""
    text = _prepare(text, placeholders)
    report = _clean_lines(text)
    _, found = sections(text)
    parts = {FINDINGS: [], IMPRESSION: []}
    for section in found:
        if section.kind in parts:
            parts[section.kind].append(section.text)
    findings = _section_text(" ".join(parts[FINDINGS]))
    impression = _section_text(" ".join(parts[IMPRESSION]))
    if findings or impression:
        return Sections(findings, impression, report)
    if not found:
        return Sections(_section_text(text), "", report, used_fallback=True)
    return Sections(_last_body_paragraph(text), "", report, used_fallback=True)


def join_hyphenated_lines(text: str) -> str:
    """`text` with words broken at line ends joined (the rule in the module docstring)."""
    def join(match: re.Match) -> str:
        word, following = match.group("word"), match.group("next")
        compound = (word.lower() in _COMPOUND_FIRST_WORDS
                    or following.lower() in _COMPOUND_LAST_WORDS
                    or (match.start() > 0 and match.string[match.start() - 1] == "-"))
        if word[-1].islower() and following[0].islower() and not compound:
            return word
        return word + "-"

    return _LINE_END_HYPHEN.sub(join, text)


def _prepare(text: str, placeholders: Placeholders) -> str:
    """Line breaks as "\\n", broken words joined, placeholders dropped or made tokens."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return placeholders.apply(join_hyphenated_lines(text))


def clean_section(text: str, placeholders: Placeholders = DEFAULT_PLACEHOLDERS) -> str:
    """One line: placeholders removed (or tokens), whitespace collapsed, stray
    punctuation closed; "" when no word but placeholders is left."""
    return _section_text(_prepare(text, placeholders))


def _section_text(text: str) -> str:
    cleaned = _clean_line(text, strip_edges=True)
    if DEID_TOKEN in cleaned and not _clean_line(cleaned.replace(DEID_TOKEN, " "),
                                                 strip_edges=True):
        return ""  # Only placeholders: as empty as with "drop".
    return cleaned


def _clean_line(text: str, *, strip_edges: bool) -> str:
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


def clean_report(text: str, placeholders: Placeholders = DEFAULT_PLACEHOLDERS) -> str:
    """The whole report, lines kept: each line cleaned like a section (its leading and
    trailing punctuation kept), blank-line runs collapsed to one, outer blank lines dropped."""
    return _clean_lines(_prepare(text, placeholders))


def _clean_lines(text: str) -> str:
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
    `other_headers`, any other capitalised "WORD:" at a line start does too (kind OTHER).
    The text is taken as it is (no placeholders replaced, no lines joined)."""
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
    for pattern in (_COLON_HEADER, _MID_LINE_HEADER, _LINE_HEADER):
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
        cleaned = _section_text(paragraph)
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
