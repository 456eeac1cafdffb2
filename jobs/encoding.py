"""Which encoding a raw document's bytes are in, and its text: BOMs first, then strict UTF-8, then
charset-normalizer over the legacy encodings documents actually arrive in (Windows/ISO/KOI8 code
pages for Latin, Cyrillic and Greek text; the CJK multi-byte ones). Short texts leave several code
pages equally plausible, so ties are settled by how word-like the decoded text is (one script per
word, a sane case pattern: KOI8-R read as cp1251 gives `рПЙЧЕФ`) and then by a fixed preference."""

from __future__ import annotations

import codecs
import unicodedata

import charset_normalizer

BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
# Preference order for equally good candidates (also the names reported for identical decodings). Rare
# code pages that mostly collide with common ones on short texts (mac_cyrillic vs cp1251) are left out.
LEGACY = (
    "latin_1", "cp1252", "iso8859_15", "cp1251", "koi8_r", "koi8_u", "cp1250", "iso8859_2", "cp1253",
    "iso8859_7", "cp1254", "cp1257", "cp1255", "cp1256", "iso8859_5",
    "gb18030", "big5", "shift_jis", "euc_jp", "euc_kr",
)  # fmt: skip
SAMPLE_BYTES = 1 << 18
MAX_CONTROL_RATIO = 0.02


class Undecodable(ValueError):
    """The bytes are not text in any supported encoding."""


def bom_encoding(data: bytes) -> str | None:
    return next((name for bom, name in BOMS if data.startswith(bom)), None)


def _script(ch: str) -> str:
    name = unicodedata.name(ch, "")
    return name.split(" ", 1)[0] if name else "?"


def wordlike(text: str) -> float:
    """Share of words made of one script's letters in lower, upper or title case."""
    words = [w for w in text.split() if any(ch.isalpha() for ch in w)]
    if not words:
        return 1.0
    good = 0
    for word in words:
        letters = [ch for ch in word if ch.isalpha()]
        cased = "".join(letters)
        one_script = len({_script(ch) for ch in letters}) == 1
        good += one_script and (cased.islower() or cased.isupper() or cased.istitle() or not cased.isalpha())
    return good / len(words)


def _sample(data: bytes) -> bytes:
    """The head of a large object, cut at a line end so no multi-byte character is split."""
    if len(data) <= SAMPLE_BYTES:
        return data
    cut = data.rfind(b"\n", 0, SAMPLE_BYTES)
    return data[: cut + 1] if cut > 0 else data[:SAMPLE_BYTES]


def check_text(sample: bytes) -> None:
    """`Undecodable` when the bytes hold more control characters than text ever does (binary data)."""
    controls = sum(1 for b in sample if b < 32 and b not in (9, 10, 12, 13))
    if controls > MAX_CONTROL_RATIO * len(sample):
        raise Undecodable(f"{controls} control bytes in the first {len(sample)}; not text")


def detect(data: bytes) -> str:
    """The encoding name of `data` (a whole object or its head); `Undecodable` for binary data.
    UTF-16/32 need their BOM (without one their NUL bytes read as binary)."""
    bom = bom_encoding(data)
    if bom:
        return bom
    sample = _sample(data)
    check_text(sample)
    try:
        sample.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError:
        pass
    matches = list(charset_normalizer.from_bytes(sample, cp_isolation=list(LEGACY)))
    if not matches:
        raise Undecodable("no supported encoding decodes it")
    least = min(m.chaos for m in matches)
    candidates = [m for m in matches if m.chaos <= least + 0.01]
    best = max(
        candidates,
        key=lambda m: (wordlike(str(m)), m.coherence, -LEGACY.index(m.encoding) if m.encoding in LEGACY else -99),
    )
    text = str(best)
    return next((name for name in LEGACY if _decodes_to(sample, name, text)), best.encoding)


def _decodes_to(data: bytes, encoding: str, text: str) -> bool:
    try:
        return data.decode(encoding) == text
    except UnicodeDecodeError:
        return False


def decode(data: bytes) -> tuple[str, str]:
    """(text, encoding) of a whole object; undecodable bytes in a legacy code page become U+FFFD."""
    if not bom_encoding(data):
        check_text(_sample(data))
        try:
            return data.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            pass
    encoding = detect(data)
    if encoding == "utf-8":  # the head is UTF-8 but a later part is not: keep the text, mark the damage
        return data.decode("utf-8", errors="replace"), encoding
    return data.decode(encoding, errors="replace"), encoding


def settle(head: bytes, whole_is_utf8: bool) -> str:
    """`decode`'s encoding for an object known only by its head (at least SAMPLE_BYTES, or all of it) and
    whether all of its bytes are valid UTF-8: for engines that read an object in pieces (Spark's line
    splits) and must name and decode it the way the whole-object read does. `Undecodable` as `decode`."""
    if not bom_encoding(head):
        check_text(_sample(head))
        if whole_is_utf8:
            return "utf-8"
    return detect(head)
