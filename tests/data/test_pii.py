"""PII and secret redaction: checksummed card numbers and IBANs, cloud and code-host keys,
international phone numbers, and IPv4 addresses only in an address context. Every kind has
look-alikes that must stay."""

from __future__ import annotations

import pytest
from latentmas.jobs.pii import iban_valid, luhn, redact


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # cards (Luhn-valid, card-like prefixes, any grouping)
        ("Card 4111 1111 1111 1111.", "Card [CARD]."),
        ("pay 5500-0000-0000-0004 now", "pay [CARD] now"),
        ("amex 378282246310005", "amex [CARD]"),
        ("visa 4012888888881881!", "visa [CARD]!"),
        # IBANs (mod 97), grouped or not
        ("IBAN DE89 3704 0044 0532 0130 00 ok", "IBAN [IBAN] ok"),
        ("to GB82WEST12345698765432.", "to [IBAN]."),
        ("FR14 2004 1010 0505 0001 3M02 606", "[IBAN]"),
        # secrets
        ("key AKIAIOSFODNN7EXAMPLE here", "key [SECRET] here"),
        ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "aws_secret_access_key = [SECRET]"),
        ("token ghp_0123456789abcdefghijABCDEFGHIJ012345", "token [SECRET]"),
        ("github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz", "[SECRET]"),
        ("slack xoxb-1234567890-abcdefghij", "slack [SECRET]"),
        ("google AIzaSyA1234567890abcdefghijklmnopqrstuv", "google [SECRET]"),
        ("-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----", "[SECRET]"),
        # phones: international and North American formats
        ("Ruf an: +49 30 1234567.", "Ruf an: [PHONE]."),
        ("London +44 20 7946 0958", "London [PHONE]"),
        ("Paris +33 1 23 45 67 89", "Paris [PHONE]"),
        ("Moscow +7 495 123-45-67", "Moscow [PHONE]"),
        ("Tokyo +81 3-1234-5678", "Tokyo [PHONE]"),
        ("from abroad 0049 89 1234567", "from abroad [PHONE]"),
        ("call (555) 201-0042 or +1 555-013-2536", "call [PHONE] or [PHONE]"),
        # addresses
        ("Mirror 192.0.2.7; mail ops7@example.net", "Mirror [IP]; mail [EMAIL]"),
        ("server at 10.0.0.1:8080", "server at [IP]:8080"),
    ],
)
def test_redacts(text: str, expected: str) -> None:
    assert redact(text)[0] == expected


@pytest.mark.parametrize(
    "text",
    [
        "Version 1.2.3.4 of the tool",
        "version 10.0.19041.1234",
        "release 2.0.0.1 and build 1.1.1.1",
        "v1.2.3.4 and python 3.11.7.1",
        "no address 999.1.1.1 or 1.2.3.256",
        "see version 1.2.3.4.5",
        "order 4111 1111 1111 1112 (Luhn fails)",
        "id 1234567890123456",
        "fake IBAN DE89 3704 0044 0532 0130 01",
        "ISBN 978-3-16-148410-0",
        "In 2023 there were 1500 users; timestamp 1699999999",
        "pi is 3.14159265358979",
        "date 2024-05-11 at 12:30",
        "+12 is not a phone, nor is +1 2",
        "AKIA in prose, ghp_short",
        "a price of 1,234,567.89 euros",
    ],
)
def test_leaves_look_alikes(text: str) -> None:
    assert redact(text) == (text, 0)


def test_checksums() -> None:
    assert luhn("4111111111111111") and not luhn("4111111111111112")
    assert iban_valid("DE89 3704 0044 0532 0130 00") and not iban_valid("DE89 3704 0044 0532 0130 01")
    assert not iban_valid("DE89")


def test_counts_each_replacement_once_when_finds_overlap() -> None:
    # The card number is also a digit run the phone patterns could see; it is replaced once.
    assert redact("x 4111-1111-1111-1111 y") == ("x [CARD] y", 1)
    assert redact("a@b.co and 192.168.1.1 and +49 30 1234567") == ("[EMAIL] and [IP] and [PHONE]", 3)
