"""Large raw objects in bounded pieces: bytes arrive in blocks, are decoded incrementally and cut
into part documents of about PART_CHARS characters at a paragraph (else line, else word) boundary,
so cleaning one 100 MB text file never holds more than a couple of parts in memory. The cuts depend
only on the text, not on how the bytes were blocked, so every engine gets the same parts."""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator

STREAM_BYTES = 1 << 20  # objects above this size are cleaned as parts
PART_CHARS = 1 << 18  # characters per part document (at most)
BLOCK_BYTES = 1 << 20  # read size, and the head used to detect the encoding


def blocks_of(data: bytes, size: int = BLOCK_BYTES) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def head_and_rest(blocks: Iterable[bytes], size: int = BLOCK_BYTES) -> tuple[bytes, Iterator[bytes]]:
    """The first `size` bytes (whatever the block sizes were) and an iterator over all the bytes."""
    iterator = iter(blocks)
    head = b""
    pending: list[bytes] = []
    for block in iterator:
        pending.append(block)
        head += block
        if len(head) >= size:
            break

    def rest() -> Iterator[bytes]:
        yield from pending
        yield from iterator

    return head[:size], rest()


def cut_point(text: str, limit: int) -> int:
    """Where to end a part of at most `limit` characters: after the last blank line, line end or
    space in its second half, else at the limit."""
    for separator in ("\n\n", "\n", " "):
        position = text.rfind(separator, limit // 2, limit)
        if position >= 0:
            return position + len(separator)
    return limit


def text_parts(blocks: Iterable[bytes], encoding: str, limit: int = PART_CHARS) -> Iterator[str]:
    """The decoded text in parts of at most `limit` characters (undecodable bytes become U+FFFD)."""
    decoder = codecs.getincrementaldecoder(encoding)(errors="replace")
    buffer = ""
    for block in blocks:
        buffer += decoder.decode(block)
        while len(buffer) >= limit:
            cut = cut_point(buffer, limit)
            yield buffer[:cut]
            buffer = buffer[cut:]
    buffer += decoder.decode(b"", final=True)
    while len(buffer) >= limit:
        cut = cut_point(buffer, limit)
        yield buffer[:cut]
        buffer = buffer[cut:]
    if buffer.strip():
        yield buffer
