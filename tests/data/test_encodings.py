# ruff: noqa: RUF001 - Cyrillic and Greek sample text on purpose
"""Raw documents in legacy encodings are decoded by detection (charset-normalizer plus a word-shape
tie-break), and both cleaning engines record the detected encoding per document."""

from __future__ import annotations

import uuid

import pytest
from latentmas.jobs.cleaning import RawRecord, Rejected, parse_object
from latentmas.jobs.encoding import decode, detect
from latentmas.jobs.outputs import read_parquet
from latentmas.stage import run_stage
from latentmas.testing.fixtures import MinioFixture

from tests.data.conftest import stage_config, stage_key

pytestmark = pytest.mark.data

RUSSIAN = (
    "Утилита выводит список файлов в каталоге. Каждый файл показан с его размером и датой изменения. "
    "Параметры командной строки позволяют отсортировать вывод по времени или по имени. "
)
GERMAN = (
    "Die Größe der Datei hängt von Herrn Müller ab. Übermäßig lange Zeilen werden gekürzt, "
    "und die Straßennamen bleiben erhalten, während Sonderzeichen wie ä, ö und ü korrekt erscheinen. "
)
GREEK = "Η φιλοσοφία της επιστήμης μελετά τη γνώση και τα όριά της, καθώς και τις μεθόδους της έρευνας. "
# name, text, encoding written, encodings a detector may report for those bytes (same decoded text).
CASES = [
    ("ru-cp1251.txt", RUSSIAN, "cp1251", {"cp1251"}),
    ("ru-koi8r.txt", RUSSIAN, "koi8_r", {"koi8_r"}),
    ("de-latin1.txt", GERMAN, "latin_1", {"latin_1", "cp1252", "iso8859_15"}),
    ("de-utf16.txt", GERMAN, "utf-16", {"utf-16"}),
    ("ru-utf8.txt", RUSSIAN, "utf-8", {"utf-8"}),
    ("de-utf8-bom.txt", GERMAN, "utf-8-sig", {"utf-8-sig"}),
    ("el-cp1253.txt", GREEK, "cp1253", {"cp1253", "iso8859_7"}),
]


@pytest.mark.parametrize(("name", "text", "written", "reported"), CASES)
def test_detects_and_decodes(name: str, text: str, written: str, reported: set[str]) -> None:
    decoded, encoding = decode(text.encode(written))
    assert decoded == text
    assert encoding in reported


@pytest.mark.parametrize(
    ("text", "written"),
    [
        ("Привет мир", "koi8_r"),
        ("Привет мир", "cp1251"),
        ("Утилита", "cp1251"),
        ("naïve café", "cp1252"),
        ("Утилита выводит список файлов в каталоге и показывает их размер.", "cp1251"),
        ("Утилита выводит список файлов в каталоге и показывает их размер.", "koi8_r"),
    ],
)
def test_short_texts_are_settled_by_word_shape(text: str, written: str) -> None:
    assert decode(text.encode(written))[0] == text


def test_binary_is_refused_and_records_carry_the_encoding() -> None:
    with pytest.raises(ValueError, match="control bytes"):
        detect(bytes(range(256)) * 4)
    [record] = parse_object("ru/a.txt", RUSSIAN.encode("koi8_r"))
    assert isinstance(record, RawRecord)
    assert (record.encoding, record.repaired, record.text) == ("koi8_r", True, RUSSIAN)
    lines = f'{{"text": "{RUSSIAN}"}}\n'.encode("cp1251")
    assert [r.encoding for r in parse_object("ru/a.jsonl", lines) if isinstance(r, RawRecord)] == ["cp1251"]
    [rejected] = parse_object("ru/b.txt", b"\x00\x01\x02\x03" * 100)
    assert isinstance(rejected, Rejected) and rejected.reason == "undecodable"


@pytest.mark.parametrize("engine", ["python", "spark"])
def test_both_engines_record_the_detected_encoding(minio: MinioFixture, engine: str, request) -> None:
    if engine == "spark":
        request.getfixturevalue("spark")
    prefix = f"enc-{engine}-{uuid.uuid4().hex[:6]}/"
    for name, text, written, _ in CASES:
        minio.store.put_bytes("raw", f"{prefix}{name.split('-')[0]}/{name}", (text * 3).encode(written))
    cycle = f"enc-{engine}"
    run_stage("clean", stage_config(minio.storage, cycle, {"cleaning": {"engine": engine, "rawPrefix": prefix}}),
              minio.store)  # fmt: skip
    corpus = read_parquet(minio.store, "artifacts", stage_key(cycle, "clean", "corpus.parquet"))
    rows = {r["source"].removeprefix(prefix).split("/")[1]: r for r in corpus.to_pylist()}
    # Same text in several encodings is an exact duplicate after decoding: the first source of each text is kept.
    assert set(rows) == {"de-latin1.txt", "el-cp1253.txt", "ru-cp1251.txt"}
    for name, text, _, reported in CASES:
        if name in rows:
            assert rows[name]["encoding"] in reported
            assert rows[name]["text"].startswith(text.strip()[:60])
