"""A run's report lines as the store keeps them: pages of consecutive line texts,
newline-joined and compressed with Zstandard.

A run's lines repeat most of their bytes (keys, periods, causes, id prefixes), so a page of
1,000 lines shrinks about 46 times at Zstandard's level 3: the 500,000 lines of the 10M-event
benchmark book take 7 MB instead of 340 MB, and the database writes, checkpoints and later
reads that much less. Zstandard lets go of the GIL while it works, so `compressed`
compresses on a thread of its own while the lines are still being made. Pages stored before
Zstandard are zlib's; `unpack` tells them apart by Zstandard's frame magic. A line's text
never holds a newline (compact JSON escapes them), so the newline separates lines without
ambiguity.

Beside its texts a page keeps its lines' keys and classes (`PageKeys`), compressed the same
way: the store finds a line by key through its customer's row (`run_customers`) and the page's
keys, and never keeps a row per line.
"""

from __future__ import annotations

import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import orjson
import zstandard

from rules.report import StoredPage

LINES_PER_PAGE = 1_000
# Zstandard's level 3, on the 10M book's report: 46x in 0.10 s per 200 MB, where zlib's
# quickest level made 19x in 0.45 s; and it decompresses five times as fast.
LEVEL = 3
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
AHEAD = 4  # pages (de)compressing at once, at most (the rest wait)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class PageKeys:
    """Each line's key and class on a stored page, in the page's order: the index the store's
    lookups by key read, kept beside the page's texts (`pack_keys`)."""

    customers: list[str]
    meters: list[str]
    periods: list[str]
    classes: list[str]

    def find(self, first: int, start: int, end: int) -> Iterator[tuple[int, str, str, str]]:
        """(position, meter, period, class) of the lines at positions [start, end) held by this
        page, whose first line is at `first`."""
        for index in range(max(start - first, 0), min(end - first, len(self.classes))):
            yield first + index, self.meters[index], self.periods[index], self.classes[index]


def pack(texts: list[str]) -> bytes:
    """A page of line texts, joined by newlines and compressed."""
    return _compress("\n".join(texts).encode())


def _compress(data: bytes) -> bytes:
    return _CODECS.compressor.compress(data)


def _decompress(body: bytes) -> bytes:
    """A page's bytes, from Zstandard or (a page stored before it) zlib."""
    return _CODECS.decompressor.decompress(body) if body[:4] == _ZSTD_MAGIC else zlib.decompress(body)


class _Codecs(threading.local):
    """A thread's own Zstandard contexts: a context is not for two threads at once, and one
    made per call (`zstandard.compress`) kept some 0.65 MB a page (300 MB on the 10M book)."""

    def __init__(self) -> None:
        self.compressor = zstandard.ZstdCompressor(level=LEVEL)
        self.decompressor = zstandard.ZstdDecompressor()


_CODECS = _Codecs()


def unpack(body: bytes) -> list[str]:
    return unpack_text(body).split("\n")


def unpack_text(body: bytes) -> str:
    """A page's lines as one text, joined by newlines."""
    return _decompress(body).decode()


def pack_keys(customers: list[str], meters: list[str], periods: list[str], classes: list[str]) -> bytes:
    """A page's keys and classes (`PageKeys`), as JSON, compressed."""
    return _compress(orjson.dumps([customers, meters, periods, classes]))


def unpack_keys(body: bytes) -> PageKeys:
    return PageKeys(*orjson.loads(_decompress(body)))


def compressed(pages: Iterable[StoredPage]) -> Iterator[tuple[StoredPage, bytes, bytes]]:
    """Each page with its text (`pack`) and its keys (`pack_keys`) compressed, in order, on a
    worker thread while the next pages are made."""
    return _ahead(_with_bodies, pages)


def _with_bodies(page: StoredPage) -> tuple[StoredPage, bytes, bytes]:
    keys = pack_keys(page.customers, page.meters, page.periods, page.classes)
    return page, _compress(page.data), keys


def unpacked(bodies: Iterable[bytes]) -> Iterator[str]:
    """Each page's text (`unpack_text`), in order, decompressed on a worker thread a few pages
    ahead of the reader."""
    return _ahead(unpack_text, bodies)


def _ahead(work: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
    """`work(item)` for each item, in order, done on a worker thread up to AHEAD items ahead of
    the one given (the codecs let go of the GIL, so it runs beside the caller's own work)."""
    pending: deque[Future[R]] = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pages") as pool:
        for item in items:
            pending.append(pool.submit(work, item))
            if len(pending) > AHEAD:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
