"""PII and secret redaction for cleaned documents: each detector finds candidate spans with a pattern
and keeps only those that pass a check (Luhn for card numbers, ISO 7064 mod 97 for IBANs, the
libphonenumber country plan for international phone numbers, octets <= 255 and no version word
before an IPv4 address), so look-alikes such as order numbers and `Version 1.2.3.4` stay intact.
Overlapping finds go to the earliest, then longest, span."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import phonenumbers

Span = tuple[int, int, str]

EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
SECRETS = [
    re.compile(p)
    for p in (
        r"\b(?:AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[A-Z0-9]{16}\b",  # AWS access key id
        r"(?i)aws_secret_access_key[\"']?\s*[:=]\s*[\"']?([A-Za-z0-9/+]{40})\b",  # AWS secret key (the value)
        r"\bgh[pousr]_[A-Za-z0-9]{36,255}\b",  # GitHub tokens
        r"\bgithub_pat_[A-Za-z0-9_]{22,255}\b",  # GitHub fine-grained tokens
        r"\bglpat-[A-Za-z0-9_\-]{20,}\b",  # GitLab personal access tokens
        r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b",  # Slack tokens
        r"\bAIza[0-9A-Za-z_\-]{35}\b",  # Google API keys
        r"\b[sr]k_(?:live|test)_[0-9A-Za-z]{16,}\b",  # Stripe keys
        r"(?i)\bAccountKey=[A-Za-z0-9+/]{86}==",  # Azure storage account keys
        r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----",
    )
]
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
CARD = re.compile(r"(?<![\d.,-])\d(?:[ -]?\d){12,18}(?![\d.,]\d|-\d)")
PHONE_NANP = re.compile(r"(?<![\w.+])(?:\+1[ .-]?)?(?:\(\d{3}\)|\d{3})[ .-]\d{3}[ .-]\d{4}(?!\w|\.\d)")
PHONE_INTL = re.compile(r"(?<![\w+])(?:\+|00)[1-9][\d \-./()]{6,22}\d(?!\w|\.\d)")
IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)(?!\w|\.\d)")
VERSION_WORD = re.compile(r"(?i)\b(?:version|ver|v|release|rel|build|revision|rev|firmware|kernel|python)\.?\s*$")
CARD_PREFIX = re.compile(r"^(?:4|5[1-5]|2[2-7]|3[47]|3[0689]|6|35|62)")


def luhn(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char) * (2 if position % 2 else 1)
        total += value - 9 if value > 9 else value
    return total % 10 == 0


def iban_valid(candidate: str) -> bool:
    """ISO 13616: length 15-34, country letters, and the mod-97 check of the rearranged number is 1."""
    iban = candidate.replace(" ", "")
    if not 15 <= len(iban) <= 34:
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def _phone_valid(candidate: str) -> bool:
    if sum(ch.isdigit() for ch in candidate) < 8:
        return False
    number = "+" + candidate[2:] if candidate.startswith("00") else candidate
    try:
        parsed = phonenumbers.parse(number, None)
    except phonenumbers.NumberParseException:
        return False
    return bool(phonenumbers.is_possible_number(parsed)) and phonenumbers.region_code_for_number(parsed) is not None


def _ip_in_context(text: str, start: int) -> bool:
    return not VERSION_WORD.search(text[max(0, start - 20) : start])


@dataclass(frozen=True)
class Detector:
    token: str
    pattern: re.Pattern[str]
    check: Callable[[str, re.Match[str]], bool] = lambda text, match: True

    @property
    def group(self) -> int:
        """Replace only the first group when the pattern has one (context words stay)."""
        return 1 if self.pattern.groups else 0


DETECTORS = [
    *(Detector("[SECRET]", p) for p in SECRETS),
    Detector("[EMAIL]", EMAIL),
    Detector("[IBAN]", IBAN, lambda text, m: iban_valid(m.group())),
    Detector(
        "[CARD]",
        CARD,
        lambda text, m: (d := re.sub(r"\D", "", m.group())) != "" and bool(CARD_PREFIX.match(d)) and luhn(d),
    ),
    Detector("[PHONE]", PHONE_INTL, lambda text, m: _phone_valid(m.group())),
    Detector("[PHONE]", PHONE_NANP),
    Detector("[IP]", IPV4, lambda text, m: _ip_in_context(text, m.start())),
]


def find(text: str) -> Iterator[Span]:
    """Every accepted (start, end, token), before overlap resolution."""
    for detector in DETECTORS:
        for match in detector.pattern.finditer(text):
            if detector.check(text, match):
                yield match.start(detector.group), match.end(detector.group), detector.token


def redact(text: str) -> tuple[str, int]:
    """The text with each PII or secret span replaced by its placeholder, and how many were replaced."""
    spans = sorted(find(text), key=lambda s: (s[0], -(s[1] - s[0])))
    out: list[str] = []
    cursor = count = 0
    for start, end, token in spans:
        if start < cursor:
            continue
        out.append(text[cursor:start])
        out.append(token)
        cursor, count = end, count + 1
    out.append(text[cursor:])
    return "".join(out), count
