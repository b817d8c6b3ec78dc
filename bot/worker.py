"""`recon worker`: takes inbox events under a lease and hands each to its handler.

- A claim is a lease (30 s by default), renewed while the handler works; a worker
  that dies leaves the event to be claimed again once the lease runs out.
- A handler that fails is retried with exponential backoff; after `max_attempts`
  the event is parked as `dead` with its last error (`recon replay` revives it).
- An event type with no handler is marked `ignored`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from bot.store import Claimed, Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    status: str = "done"  # done | ignored
    run_id: str | None = None


Handler = Callable[[Claimed], Outcome]


def utc_now() -> datetime:
    return datetime.now(UTC)


def at_most_every(seconds: float, action: Callable[[], object]) -> Callable[[], None]:
    """`action`, run when called unless it ran less than `seconds` ago (for the idle loop)."""
    last = [float("-inf")]  # float ok: a monotonic clock reading

    def maybe() -> None:
        if time.monotonic() - last[0] >= seconds:
            last[0] = time.monotonic()
            action()

    return maybe


def default_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class Worker:
    store: Store
    handlers: Mapping[tuple[str, str], Handler]
    name: str = field(default_factory=default_name)
    lease: timedelta = timedelta(seconds=30)
    max_attempts: int = 8
    backoff: timedelta = timedelta(seconds=30)
    max_backoff: timedelta = timedelta(hours=1)
    clock: Callable[[], datetime] = utc_now
    renewer: Callable[[], Store] | None = None  # the store the lease heartbeat uses (`Store.sibling`)

    def run_once(self) -> bool:
        """Claim and process one event; False when nothing is ready."""
        claimed = self.store.claim(self.name, self.clock(), self.lease)
        if claimed is None:
            return False
        handler = self.handlers.get((claimed.provider, claimed.type))
        if handler is None:
            self.store.finish(claimed, self.name, "ignored")
            log.info("event %s %s ignored", claimed.event_id, claimed.type)
            return True
        with _Heartbeat(self, claimed):
            try:
                outcome = handler(claimed)
            except Exception as exc:  # noqa: BLE001 - any failure is recorded on the event
                self._failed(claimed, exc)
                return True
        if not self.store.finish(claimed, self.name, outcome.status, outcome.run_id):
            log.warning("event %s: lease lost before finishing; another worker owns it", claimed.event_id)
        log.info("event %s %s %s run=%s", claimed.event_id, claimed.type, outcome.status, outcome.run_id)
        return True

    def run(self, stop: threading.Event, idle: float = 1.0, between: Callable[[], None] | None = None) -> None:
        """Process events until `stop` is set; `between` runs when the inbox is empty (the sweep)."""
        while not stop.is_set():
            if not self.run_once():
                self.store.checkpoint()
                if between is not None:
                    between()
                stop.wait(idle)

    def _failed(self, claimed: Claimed, exc: Exception) -> None:
        error = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        if claimed.attempts >= self.max_attempts:
            self.store.fail(claimed, self.name, error, None)
            log.error("event %s %s dead after %d attempts: %s", claimed.event_id, claimed.type, claimed.attempts, error)
            return
        wait = min(self.backoff * 2 ** (claimed.attempts - 1), self.max_backoff)
        self.store.fail(claimed, self.name, error, self.clock() + wait)
        log.warning(
            "event %s %s failed (attempt %d), retry in %s: %s",
            claimed.event_id,
            claimed.type,
            claimed.attempts,
            wait,
            error,
        )


class _Heartbeat:
    """Renews the lease every third of its length while a handler runs."""

    def __init__(self, worker: Worker, claimed: Claimed) -> None:
        self.worker, self.claimed = worker, claimed
        self.done = threading.Event()
        self.thread: threading.Thread | None = None

    def __enter__(self) -> _Heartbeat:
        if self.worker.renewer is not None:
            self.thread = threading.Thread(target=self._beat, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        if self.thread is not None:
            self.thread.join()

    def _beat(self) -> None:
        assert self.worker.renewer is not None
        store = self.worker.renewer()
        interval = self.worker.lease.total_seconds() / 3
        try:
            while not self.done.wait(interval):
                store.renew(self.claimed, self.worker.name, self.worker.clock() + self.worker.lease)
        finally:
            if store is not self.worker.store:
                store.close()
