"""A run's report lines as the store keeps them: pages of consecutive line texts,
newline-joined and zlib-compressed.

A run's lines repeat most of their bytes (keys, periods, causes, id prefixes), so a page of
1,000 lines shrinks about 19 times at zlib's quickest level: the 500,000 lines of the 10M-event
benchmark book take 18 MB instead of 340 MB, and the database writes, checkpoints and later
reads that much less. zlib lets go of the GIL while it works, so `packed` compresses on a
thread of its own while the lines are still being made. A line's text never holds a newline
(compact JSON escapes them), so the newline separates lines without ambiguity.
"""

from __future__ import annotations

import zlib
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice

LINES_PER_PAGE = 1_000
LEVEL = 1  # zlib's quickest: 19x on report lines; level 6 gains a third more at 2.6 times the time
AHEAD = 4  # pages compressing at once, at most (the rest wait as text)


def pack(texts: list[str]) -> bytes:
    return zlib.compress("\n".join(texts).encode(), LEVEL)


def unpack(body: bytes) -> list[str]:
    return unpack_text(body).split("\n")


def unpack_text(body: bytes) -> str:
    """A page's lines as one text, joined by newlines."""
    return zlib.decompress(body).decode()


def packed(texts: Iterable[str], size: int = LINES_PER_PAGE) -> Iterator[tuple[int, bytes]]:
    """`texts` in pages of `size` lines, as (position of the page's first line, compressed page),
    in order; each page is compressed on a worker thread while the next one is gathered."""
    lines = iter(texts)
    pending: deque[tuple[int, Future[bytes]]] = deque()
    first = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pages") as pool:
        while chunk := list(islice(lines, size)):
            pending.append((first, pool.submit(pack, chunk)))
            first += len(chunk)
            if len(pending) > AHEAD:
                start, body = pending.popleft()
                yield start, body.result()
        while pending:
            start, body = pending.popleft()
            yield start, body.result()


def unpacked(bodies: Iterable[bytes]) -> Iterator[str]:
    """Each page's text (`unpack_text`), in order, decompressed on a worker thread a few pages
    ahead of the reader."""
    pending: deque[Future[str]] = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pages") as pool:
        for body in bodies:
            pending.append(pool.submit(unpack_text, body))
            if len(pending) > AHEAD:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
