# ruff: noqa: RUF001 - Cyrillic sample words on purpose
"""The driver's side of Spark's line reads of large objects, without Spark: the encoding settled from
a head plus validity equals the whole-object decode, splits are numbered as `str.splitlines` counts
the whole text, formats parsed whole are refused above their limit in one line. Also the large
objects the cluster test reads as lines (tests/data/test_spark_cluster.py)."""

from __future__ import annotations

import functools
import itertools
import json
import random
from typing import NamedTuple
from urllib.parse import quote

import pytest
from latentmas.jobs.cleaning import Rejected, process_object
from latentmas.jobs.encoding import SAMPLE_BYTES, Undecodable, decode, settle
from latentmas.jobs.parts import BLOCK_BYTES
from latentmas.jobs.spark_reads import (
    LINE_READ_BYTES,
    WHOLE_OBJECT_BYTES,
    LineObject,
    item_row,
    number_splits,
    parse_splits,
    plan_reads,
    split_stats,
    stream_objects,
)
from latentmas.spec import CleaningSpec
from latentmas.store import ObjectInfo

pytestmark = pytest.mark.data

ENGLISH = (  # noqa: SIM905 - a sentence reads better than a word list
    "the module reads each file and reports its size while the parser keeps a table of names for every "
    "option given on the command line so that later calls find them again without another pass over input"
).split()
RUSSIAN = (  # noqa: SIM905
    "утилита выводит список файлов в каталоге каждый файл показан с его размером и датой изменения "
    "параметры командной строки позволяют отсортировать вывод по времени или по имени"
).split()


def prose(rng: random.Random, words: list[str], count: int) -> str:
    return " ".join(rng.choice(words) + (str(rng.randrange(1000)) if rng.random() < 0.2 else "") for _ in range(count))


def jsonl_lines(rng: random.Random, words: list[str], size: int, encoding: str) -> bytes:
    """A JSONL object of about `size` bytes in `encoding`: mostly short (too short) records, some
    documents kept, blank lines, CRLF ends, broken and field-less records, and lines `str.splitlines`
    cuts where a line reader does not (U+2028 inside a string, a form feed)."""
    out, total, number = [], 0, 0
    while total < size:
        number += 1
        if number % 97 == 0:
            line = json.dumps({"text": prose(rng, words, 60), "title": f"doc {number}"}, ensure_ascii=False)
        elif number % 89 == 5:
            line = ""
        elif number % 101 == 7:
            line = '{"text": "broken'
        elif number % 103 == 9:
            line = '{"body": 3}'
        elif number == 500:
            separator = "\u2028" if encoding == "utf-8" else "\x1c"  # both end a line for str.splitlines
            line = '{"text": "split' + separator + 'by a line separator inside a string"}'
        elif number == 700:
            line = '{"text": "a form\x0cfeed"}'
        else:
            line = json.dumps({"text": f"{number} {prose(rng, words, 30)}"[:150]}, ensure_ascii=False)
        data = line.encode(encoding) + (b"\r\n" if number % 13 == 0 else b"\n")
        out.append(data)
        total += len(data)
    return b"".join(out)


@functools.cache
def large_objects(size: int = LINE_READ_BYTES) -> dict[str, bytes]:
    """Objects of a little over `size` bytes (relative keys -> bytes): UTF-8 JSONL with an invalid byte
    past the encoding sample and no final newline, cp1251 JSONL, and plain text (in parts when large)."""
    rng = random.Random(18)
    utf8 = bytearray(jsonl_lines(rng, ENGLISH, size + 60_000, "utf-8").rstrip(b"\r\n"))
    cut = utf8.index(b'"text": "', SAMPLE_BYTES + 1000) + len(b'"text": "')
    utf8[cut:cut] = b"\xff"  # not UTF-8 after a valid head: decoded with U+FFFD, named utf-8
    text = b""
    while len(text) < size + 20_000:
        text += prose(rng, ENGLISH, rng.randrange(40, 120)).encode() + b".\n\n"
    return {
        "math/lines-utf8.jsonl": bytes(utf8),
        "python/lines-cp1251.jsonl": jsonl_lines(rng, RUSSIAN, size + 30_000, "cp1251"),
        "linux/long.txt": text,
    }


SMALL = SAMPLE_BYTES + 100_000  # enough for an invalid byte past the encoding sample


class Line(NamedTuple):
    """A row as Spark's text source gives it (`read_lines`)."""

    path: str
    size: int
    start: int
    line: bytes


def line_rows(key: str, data: bytes, cut: int) -> list[Line]:
    """The rows of `data` cut into splits at the first line end after each `cut` bytes, as a line reader does."""
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines.pop()
    rows, start, offset = [], 0, 0
    for line in lines:
        rows.append(Line(BUCKET + quote(key), len(data), start, line))
        offset += len(line) + 1
        if offset - start >= cut:
            start = offset
    return rows


def two_passes(key: str, domain: str, data: bytes, cut: int, spec: CleaningSpec) -> list[tuple]:
    """The JSONL line read, split by split in "tasks" of one split each, the driver deciding between."""
    obj = LineObject(key, domain, len(data), data[:BLOCK_BYTES])
    rows = line_rows(key, data, cut)
    tasks = [list(group) for _, group in itertools.groupby(rows, key=lambda row: row.start)]
    stats = [s for task in tasks for s in split_stats(task, BUCKET, {key: obj.candidates()})]
    assert len(stats) >= 3
    numbered = number_splits(obj, stats)
    if isinstance(numbered, Rejected):
        return [item_row(numbered)]
    return [
        row for task in reversed(tasks) for row in parse_splits(task, BUCKET, {key: numbered}, spec.model_dump_json())
    ]


BUCKET = "s3a://raw/"


@pytest.mark.parametrize(("name", "cut"), [("math/lines-utf8.jsonl", 50_000), ("python/lines-cp1251.jsonl", 77_777)])
def test_split_jsonl_gives_the_whole_object_rows(name: str, cut: int) -> None:
    data = large_objects(SMALL)[name]
    key, spec = "raw/" + name.replace("lines-", "lines [%x] "), CleaningSpec(raw_prefix="raw/")  # quoted in paths
    whole = sorted(item_row(item) for item in process_object(key, data, spec))
    assert sorted(two_passes(key, name.split("/")[0], data, cut, spec)) == whole
    assert {row[0] for row in whole} == {"doc", "rej"} and len(whole) > 1000


def test_streamed_objects_give_the_whole_object_rows() -> None:
    spec = CleaningSpec(raw_prefix="raw/")
    objects = {"raw/linux/long.txt": large_objects()["linux/long.txt"], "raw/math/table.csv": CSV}
    rows = [row for key, data in objects.items() for row in line_rows(key, data, 200_000)]
    got = list(stream_objects(rows, BUCKET, spec.model_dump_json()))
    assert got == [item_row(item) for key, data in objects.items() for item in process_object(key, data, spec)]
    assert sum(row[1].startswith("raw/linux/long.txt#p") for row in got) >= 4


CSV = b"title,text\n" + b"".join(b'row %d,"a quoted\nfield over two lines %d"\n' % (i, i) for i in range(5_000))


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_settle_names_what_decode_names() -> None:
    head_valid = ("a line of text\n" * 30_000).encode()
    cases = [
        head_valid,
        head_valid + b"caf\xe9 at the end\n",  # UTF-8 head, not UTF-8 later: utf-8, replaced
        ("Утилита выводит список файлов.\n" * 20_000).encode("cp1251"),
        "Die Größe der Datei\n".encode("utf-16") * 2,
        b"\xef\xbb\xbf" + head_valid,
        b"\x00\x01\x02\x03" * 100_000,
    ]
    for data in cases:
        try:
            expected: str | type[Undecodable] = decode(data)[1]
        except Undecodable:
            expected = Undecodable
        try:
            got: str | type[Undecodable] = settle(data[:BLOCK_BYTES], is_utf8(data))
        except Undecodable:
            got = Undecodable
        assert got == expected, data[:40]


def test_empty_and_binary_large_objects_are_rejected_like_the_whole_read() -> None:
    spec = CleaningSpec(raw_prefix="raw/")
    for data, reason in ((b" \n\t\n" * 100_000, "empty"), (b"\x00\x01\n" * 130_000, "undecodable")):
        expected = [item_row(item) for item in process_object("raw/math/x.jsonl", data, spec)]
        assert two_passes("raw/math/x.jsonl", "math", data, 50_000, spec) == expected
        assert expected[0][3] == reason


def test_lost_bytes_between_splits_are_an_error() -> None:
    data = large_objects(SMALL)["math/lines-utf8.jsonl"]
    obj = LineObject("raw/math/lines-utf8.jsonl", "math", len(data), data[:BLOCK_BYTES])
    rows = line_rows(obj.key, data, 100_000)
    splits = list(split_stats(rows, BUCKET, {obj.key: obj.candidates()}))
    with pytest.raises(RuntimeError, match=r"raw/math/lines-utf8.jsonl.* the line splits hold \d+ bytes of its"):
        number_splits(obj, splits[1:])


def test_plan_routes_large_objects_and_refuses_whole_formats_too_big() -> None:
    heads = {"raw/a/x.jsonl": b'{"text": "x"}\n', "raw/a/y.jsonl": "{}\n".encode("utf-16")}
    big = LINE_READ_BYTES + 1
    infos = [ObjectInfo(key, big, "") for key in (*heads, "raw/a/z.txt", "raw/a/w.csv", "raw/a/v.bin", "raw/top.txt")]
    plan = plan_reads(infos, CleaningSpec(raw_prefix="raw/"), heads.__getitem__)
    assert [o.key for o in plan.lines] == ["raw/a/x.jsonl"]
    assert [o.key for o in plan.streamed] == ["raw/a/y.jsonl", "raw/a/z.txt", "raw/a/w.csv"]
    assert [(r.source, r.reason) for r in plan.rejected] == [
        ("raw/a/v.bin", "unsupported_format"),
        ("raw/top.txt", "no_domain"),
    ]
    huge = [
        ObjectInfo("raw/a/huge.txt", WHOLE_OBJECT_BYTES * 4, ""),
        ObjectInfo("raw/a/huge.html", WHOLE_OBJECT_BYTES + 1, ""),
    ]
    with pytest.raises(RuntimeError, match=r"'raw/a/huge.html' is \d+ bytes: html objects are parsed whole"):
        plan_reads(huge, CleaningSpec(raw_prefix="raw/"), heads.__getitem__)
    assert [o.key for o in plan_reads(huge[:1], CleaningSpec(raw_prefix="raw/"), heads.__getitem__).streamed] == [
        "raw/a/huge.txt"
    ]
