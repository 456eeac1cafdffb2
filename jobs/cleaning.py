"""Per-object and per-document cleaning logic, shared by the Spark and python engines so both give
the same output: parsing each format, decoding repair, normalisation, boilerplate removal, quality
filters, PII redaction, sentence-aware chunking and per-document metrics. Pure functions only."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import unicodedata
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser

from latentmas.jobs.encoding import Undecodable, decode, detect
from latentmas.jobs.parts import STREAM_BYTES, blocks_of, head_and_rest, text_parts
from latentmas.jobs.pii import redact
from latentmas.spec import CleaningSpec

TEXT_FIELDS = ("text", "body", "content")
FORMATS = {
    "txt": "txt",
    "text": "txt",
    "md": "md",
    "markdown": "md",
    "html": "html",
    "htm": "html",
    "jsonl": "jsonl",
    "csv": "csv",
}
BOILERPLATE = [
    re.compile(p, re.I)
    for p in (
        r"^copyright \(c\) \d{4}[^.]{0,60}\. all rights reserved\.?$",
        r"^subscribe to our newsletter.*$",
        r"^(\w[\w ]{0,20} \| ){2,}\w[\w ]{0,20}$",
        r"^this page was generated automatically.*$",
    )
]
WORD = re.compile(r"\w+")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
STOPWORDS = frozenset(
    [
        "the",
        "of",
        "and",
        "to",
        "a",
        "in",
        "is",
        "it",
        "that",
        "for",
        "on",
        "with",
        "as",
        "was",
        "by",
        "be",
        "this",
        "are",
        "or",
        "an",
        "from",
        "at",
        "which",
        "not",
        "can",
        "if",
    ]
)
METRIC_NAMES = (
    "chars",
    "words",
    "lines",
    "sentences",
    "avg_word_len",
    "avg_sentence_words",
    "max_line_len",
    "unique_word_ratio",
    "stopword_ratio",
    "symbol_ratio",
    "digit_ratio",
    "upper_ratio",
    "whitespace_ratio",
    "punctuation_ratio",
    "pii_redactions",
    "encoding_repaired",
    "chunk_count",
)


@dataclass(frozen=True)
class RawRecord:
    """One document found in a raw object (a file, a JSONL line or a CSV row)."""

    source: str
    domain: str
    fmt: str
    text: str
    title: str = ""
    encoding: str = "utf-8"

    @property
    def repaired(self) -> bool:
        """Decoded from something other than UTF-8 (the text was re-encoded)."""
        return not self.encoding.startswith("utf-8")


@dataclass(frozen=True)
class Rejected:
    """A quarantined record: where it came from and why."""

    source: str
    domain: str
    reason: str
    detail: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"source": self.source, "domain": self.domain, "reason": self.reason, "detail": self.detail}


@dataclass(frozen=True)
class Chunk:
    chunk_id: str
    doc_id: str
    domain: str
    source: str
    text: str

    def as_dict(self) -> dict[str, str]:
        return {
            "chunk_id": self.chunk_id,
            "doc_id": self.doc_id,
            "domain": self.domain,
            "source": self.source,
            "text": self.text,
        }


@dataclass(frozen=True)
class CleanDoc:
    doc_id: str
    domain: str
    source: str
    fmt: str
    title: str
    text: str
    content_hash: str
    metrics: dict[str, float]
    encoding: str = "utf-8"
    chunks: list[Chunk] = field(default_factory=list)
    shingles: list[int] = field(default_factory=list)


# ---- decoding and parsing ---------------------------------------------------------------------------
def domain_of(key: str) -> str | None:
    """The domain label is the first path segment of the object key (`python/json.txt` -> python)."""
    head, sep, _ = key.partition("/")
    return head if sep and head else None


def is_hidden(key: str) -> bool:
    """Spark and Hadoop skip files and folders starting with `_` or `.`; both engines quarantine them."""
    return any(part.startswith(("_", ".")) for part in key.split("/"))


class _HTMLText(HTMLParser):
    SKIP = {"script", "style", "nav", "header", "footer", "noscript", "template"}
    BLOCK = {"p", "div", "br", "li", "tr", "dt", "dd", "section", "article", "table", "pre", "ul", "ol", "hr", "dl"}
    HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6", "title"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_depth = 0
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.SKIP:
            self.skip_depth += 1
        elif tag == "title":
            self._in_title = True
        elif tag in self.HEADINGS:
            self.parts.append("\n\n")
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self.skip_depth = max(0, self.skip_depth - 1)
        elif tag == "title":
            self._in_title = False
        elif tag in self.HEADINGS:
            self.parts.append("\n\n")
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        elif not self.skip_depth:
            self.parts.append(data)


def html_to_text(markup: str) -> tuple[str, str]:
    parser = _HTMLText()
    parser.feed(markup)
    parser.close()
    return "".join(parser.parts), parser.title.strip()


def markdown_to_text(markup: str) -> tuple[str, str]:
    title = ""
    lines = []
    for line in markup.splitlines():
        if line.strip().startswith("```"):
            continue
        heading = re.match(r"^\s{0,3}#{1,6}\s+(.*)$", line)
        if heading:
            line = heading.group(1).strip()
            title = title or line
        line = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", line)
        line = re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", line)
        line = re.sub(r"(\*\*|__|`)", "", line)
        lines.append(line)
    return "\n".join(lines), title.replace("`", "")


def classify(key: str, prefix: str) -> tuple[str, str] | Rejected:
    """(domain, format) of a raw object key, or why the object is not read at all."""
    domain = domain_of(key.removeprefix(prefix))
    if domain is None:
        return Rejected(key, "", "no_domain", "object key has no <domain>/ prefix")
    if is_hidden(key.removeprefix(prefix)):
        return Rejected(key, domain, "hidden_object", "names starting with _ or . are skipped by the engines")
    ext = key.rsplit(".", 1)[-1].lower() if "." in key.rsplit("/", 1)[-1] else ""
    fmt = FORMATS.get(ext)
    if fmt is None:
        return Rejected(key, domain, "unsupported_format", f"extension {ext or '(none)'!r}")
    return domain, fmt


def is_streamed(fmt: str, size: int) -> bool:
    """Large plain-text and Markdown objects are cleaned in parts (`latentmas.jobs.parts`)."""
    return size > STREAM_BYTES and fmt in ("txt", "md")


def parse_parts(key: str, domain: str, fmt: str, blocks: Iterable[bytes]) -> Iterator[RawRecord | Rejected]:
    """A large object's part documents (`<key>#p00001`, ...), read block by block."""
    head, rest = head_and_rest(blocks)
    try:
        encoding = detect(head)
    except Undecodable as err:
        yield Rejected(key, domain, "undecodable", str(err))
        return
    for number, part in enumerate(text_parts(rest, encoding), 1):
        body, title = markdown_to_text(part) if fmt == "md" else (part, "")
        yield RawRecord(f"{key}#p{number:05d}", domain, fmt, body, title, encoding)


def parse_stream(key: str, size: int, blocks: Iterable[bytes], prefix: str = "") -> Iterator[RawRecord | Rejected]:
    """parse_object for an object read in blocks: large text is parsed part by part, the rest whole."""
    kind = classify(key, prefix)
    if isinstance(kind, Rejected):
        yield kind
    elif is_streamed(kind[1], size):
        yield from parse_parts(key, *kind, blocks)
    else:
        yield from parse_object(key, b"".join(blocks), prefix)


def parse_object(key: str, data: bytes, prefix: str = "") -> list[RawRecord | Rejected]:
    """Every document of one raw object, or why it was rejected; never raises on bad content.
    The domain is the first path segment after `prefix` (the stage's raw prefix)."""
    kind = classify(key, prefix)
    if isinstance(kind, Rejected):
        return [kind]
    domain, fmt = kind
    if is_streamed(fmt, len(data)):
        return list(parse_parts(key, domain, fmt, blocks_of(data)))
    if not data.strip():
        return [Rejected(key, domain, "empty", f"{len(data)} bytes, no text")]
    try:
        text, encoding = decode(data)
    except Undecodable as err:
        return [Rejected(key, domain, "undecodable", str(err))]
    if fmt == "jsonl":
        return _parse_jsonl(key, domain, text, encoding)
    if fmt == "csv":
        return _parse_csv(key, domain, text, encoding)
    if fmt == "html":
        body, title = html_to_text(text)
    elif fmt == "md":
        body, title = markdown_to_text(text)
    else:
        body, title = text, ""
    return [RawRecord(key, domain, fmt, body, title, encoding)]


def _parse_jsonl(key: str, domain: str, text: str, encoding: str) -> list[RawRecord | Rejected]:
    records = (jsonl_record(key, domain, number, line, encoding) for number, line in enumerate(text.splitlines(), 1))
    return [r for r in records if r is not None]


def jsonl_record(key: str, domain: str, number: int, line: str, encoding: str) -> RawRecord | Rejected | None:
    """Line `number` (1-based, as `str.splitlines` counts) of a JSONL object: its document, why it was
    rejected, or None for a blank line. Apart from the whole-object parse so that Spark can parse an
    object's lines in many tasks."""
    if not line.strip():
        return None
    source = f"{key}#{number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        return Rejected(source, domain, "parse_error", f"line {number}: {err.msg}")
    body = next((record[f] for f in TEXT_FIELDS if isinstance(record, dict) and isinstance(record.get(f), str)), None)
    if body is None:
        return Rejected(source, domain, "missing_field", f"line {number}: no string field {'/'.join(TEXT_FIELDS)}")
    return RawRecord(source, domain, "jsonl", body, str(record.get("title") or ""), encoding)


def _parse_csv(key: str, domain: str, text: str, encoding: str) -> list[RawRecord | Rejected]:
    try:
        reader = csv.DictReader(io.StringIO(text))
        columns = reader.fieldnames or []
        field_name = next((f for f in TEXT_FIELDS if f in columns), None)
        if field_name is None:
            return [
                Rejected(
                    key, domain, "missing_column", f"no {'/'.join(TEXT_FIELDS)} column; columns: {', '.join(columns)}"
                )
            ]
        return [
            RawRecord(f"{key}#{number}", domain, "csv", row.get(field_name) or "", row.get("title") or "", encoding)
            for number, row in enumerate(reader, 1)
        ]
    except csv.Error as err:
        return [Rejected(key, domain, "parse_error", f"csv: {err}")]


# ---- cleaning -------------------------------------------------------------------------------------------
def normalize(text: str) -> str:
    """NFKC, no control characters, single spaces, at most one blank line in a row."""
    text = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n")
    if not text.replace("\n", "").replace("\t", "").isprintable():  # printable text has no category C
        text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
    lines = [" ".join(line.split()) for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def strip_boilerplate(text: str) -> str:
    return "\n".join(line for line in text.split("\n") if not any(p.match(line.strip()) for p in BOILERPLATE))


def symbol_ratio(text: str) -> float:
    visible = len(text) - sum(map(str.isspace, text))
    return (visible - sum(map(str.isalnum, text))) / visible if visible else 0.0


def heading(text: str, limit: int = 100) -> str:
    """A plain-text document's title: its first line when that is short (man page and pydoc headers)."""
    first = text.split("\n", 1)[0].strip()
    return first if len(first) <= limit else ""


def doc_id_for(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:16]


# ---- near-duplicate shingles ----------------------------------------------------------------------------
NUM_FEATURES = 1 << 20
SHINGLE_WORDS = 5


def shingles(text: str) -> list[int]:
    """Sorted feature indices (CRC-32 mod 2^20) of lower-cased word 5-grams: the same input for both
    MinHash engines, stable across processes (unlike `hash`)."""
    words = WORD.findall(text.lower())
    grams = (" ".join(words[i : i + SHINGLE_WORDS]) for i in range(max(1, len(words) - SHINGLE_WORDS + 1)))
    return sorted({zlib.crc32(g.encode()) % NUM_FEATURES for g in grams})


# ---- chunking -------------------------------------------------------------------------------------------
def _units(text: str, limit: int) -> list[tuple[str, bool]]:
    """Sentences (hard-split at word boundaries when longer than `limit`), flagged at paragraph starts."""
    units: list[tuple[str, bool]] = []
    for paragraph in re.split(r"\n\s*\n", text):
        first = True
        for sentence in SENTENCE_END.split(paragraph.strip()):
            sentence = sentence.strip()
            while len(sentence) > limit:
                cut = sentence.rfind(" ", 0, limit)
                cut = cut if cut > limit // 2 else limit
                units.append((sentence[:cut].strip(), first))
                sentence, first = sentence[cut:].strip(), False
            if sentence:
                units.append((sentence, first))
                first = False
    return units


def chunk_text(text: str, size: int, overlap: int) -> list[str]:
    """Sentence-aware sliding window: chunks of up to `size` chars repeating ~`overlap` chars of context."""
    units = _units(text, size)
    chunks: list[str] = []
    start = 0
    while start < len(units):
        end, length = start, 0
        while end < len(units) and (end == start or length + 1 + len(units[end][0]) <= size):
            length += len(units[end][0]) + (1 if end > start else 0)
            end += 1
        parts = [units[start][0]] + [("\n\n" if para else " ") + t for t, para in units[start + 1 : end]]
        chunks.append("".join(parts))
        if end >= len(units):
            break
        back, carried = end, 0
        while back - 1 > start and carried + len(units[back - 1][0]) <= overlap:
            back -= 1
            carried += len(units[back][0])
        start = max(back, start + 1)
    return chunks


# ---- metrics --------------------------------------------------------------------------------------------
def metrics(text: str, pii: int, repaired: bool, chunk_count: int) -> dict[str, float]:
    """Per-document numeric metrics (the quant stage's input); all floats for one schema in both engines.
    Counted in single passes without per-character lists, so memory stays near the text's own size."""
    words = word_length = stopwords = 0
    unique: set[str] = set()
    for match in WORD.finditer(text):
        word = match.group().lower()
        words += 1
        word_length += len(word)
        unique.add(word)
        stopwords += word in STOPWORDS
    sentences = sum(1 for s in SENTENCE_END.split(text) if s.strip())
    chars = len(text) or 1
    letters = sum(map(str.isalpha, text))
    values = {
        "chars": len(text),
        "words": words,
        "lines": text.count("\n") + 1,
        "sentences": sentences,
        "avg_word_len": word_length / words if words else 0.0,
        "avg_sentence_words": words / sentences if sentences else 0.0,
        "max_line_len": max(map(len, text.split("\n"))),
        "unique_word_ratio": len(unique) / words if words else 0.0,
        "stopword_ratio": stopwords / words if words else 0.0,
        "symbol_ratio": symbol_ratio(text),
        "digit_ratio": sum(map(str.isdigit, text)) / chars,
        "upper_ratio": sum(map(str.isupper, filter(str.isalpha, text))) / letters if letters else 0.0,
        "whitespace_ratio": sum(map(str.isspace, text)) / chars,
        "punctuation_ratio": sum(1 for c in map(unicodedata.category, text) if c[0] == "P") / chars,
        "pii_redactions": pii,
        "encoding_repaired": 1 if repaired else 0,
        "chunk_count": chunk_count,
    }
    return {name: round(float(values[name]), 6) for name in METRIC_NAMES}


def clean_record(record: RawRecord, spec: CleaningSpec) -> CleanDoc | Rejected:
    """Normalises, filters, redacts, chunks and measures one document."""
    text = normalize(strip_boilerplate(normalize(record.text)))
    if not text:
        return Rejected(record.source, record.domain, "empty", "no text after cleaning")
    if len(text) < spec.min_chars:
        return Rejected(record.source, record.domain, "too_short", f"{len(text)} < {spec.min_chars} chars")
    ratio = symbol_ratio(text)
    if ratio > spec.max_symbol_ratio:
        return Rejected(record.source, record.domain, "symbol_ratio", f"{ratio:.3f} > {spec.max_symbol_ratio}")
    pii = 0
    if spec.redact_pii:
        text, pii = redact(text)
    doc_id = doc_id_for(record.source)
    pieces = chunk_text(text, spec.chunk_chars, spec.chunk_overlap)
    chunks = [Chunk(f"{doc_id}-{i:04d}", doc_id, record.domain, record.source, piece) for i, piece in enumerate(pieces)]
    return CleanDoc(
        doc_id=doc_id,
        domain=record.domain,
        source=record.source,
        fmt=record.fmt,
        title=normalize(record.title) or heading(text),
        text=text,
        content_hash=hashlib.sha256(text.encode()).hexdigest(),
        metrics=metrics(text, pii, record.repaired, len(chunks)),
        encoding=record.encoding,
        chunks=chunks,
        shingles=shingles(text),
    )


def process_object(key: str, data: bytes, spec: CleaningSpec) -> list[CleanDoc | Rejected]:
    """parse_object + clean_record: the per-object work both engines run (Spark inside a flatMap)."""
    return [clean_record(r, spec) if isinstance(r, RawRecord) else r for r in parse_object(key, data, spec.raw_prefix)]


def process_stream(key: str, size: int, blocks: Iterable[bytes], spec: CleaningSpec) -> Iterator[CleanDoc | Rejected]:
    """process_object for an object read in blocks (the python engine): one part in memory at a time."""
    for record in parse_stream(key, size, blocks, spec.raw_prefix):
        yield clean_record(record, spec) if isinstance(record, RawRecord) else record


def near_detail(kept_source: str, similarity: float) -> str:
    return f"similar to {kept_source} (jaccard {similarity:.4f})"
