"""A run's report lines as the store keeps them: pages of consecutive line texts,
newline-joined and zlib-compressed.

A run's lines repeat most of their bytes (keys, periods, causes, id prefixes), so a page of
1,000 lines shrinks about 19 times at zlib's quickest level: the 500,000 lines of the 10M-event
benchmark book take 18 MB instead of 340 MB, and the database writes, checkpoints and later
reads that much less. zlib lets go of the GIL while it works, so `compressed` compresses on
a thread of its own while the lines are still being made. A line's text never holds a newline
(compact JSON escapes them), so the newline separates lines without ambiguity.
"""

from __future__ import annotations

import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol, TypeVar

LINES_PER_PAGE = 1_000
LEVEL = 1  # zlib's quickest: 19x on report lines; level 6 gains a third more at 2.6 times the time
AHEAD = 4  # pages (de)compressing at once, at most (the rest wait)

T = TypeVar("T")
R = TypeVar("R")


class _Page(Protocol):
    data: bytes


P = TypeVar("P", bound=_Page)


def pack(texts: list[str]) -> bytes:
    """A page of line texts, joined by newlines and compressed."""
    return zlib.compress("\n".join(texts).encode(), LEVEL)


def unpack(body: bytes) -> list[str]:
    return unpack_text(body).split("\n")


def unpack_text(body: bytes) -> str:
    """A page's lines as one text, joined by newlines."""
    return zlib.decompress(body).decode()


def compressed(pages: Iterable[P]) -> Iterator[tuple[P, bytes]]:
    """Each page with its text compressed (a page has `data`: its lines joined by newlines, in
    UTF-8), in order, compressed on a worker thread while the next pages are made."""
    return _ahead(_with_body, pages)


def _with_body(page: P) -> tuple[P, bytes]:
    return page, zlib.compress(page.data, LEVEL)


def unpacked(bodies: Iterable[bytes]) -> Iterator[str]:
    """Each page's text (`unpack_text`), in order, decompressed on a worker thread a few pages
    ahead of the reader."""
    return _ahead(unpack_text, bodies)


def _ahead(work: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
    """`work(item)` for each item, in order, done on a worker thread up to AHEAD items ahead of
    the one given (zlib lets go of the GIL, so it runs beside the caller's own work)."""
    pending: deque[Future[R]] = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pages") as pool:
        for item in items:
            pending.append(pool.submit(work, item))
            if len(pending) > AHEAD:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
