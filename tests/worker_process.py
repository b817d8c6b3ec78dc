"""A `recon worker` process for the tests of several workers on one inbox.

    python -m tests.worker_process DATABASE_URL NAME LEASE_SECONDS LOG_DIR

It runs the real worker loop (claim, lease heartbeat, finish) on the real store, with
one handler for ("test", "job") events that records a run keyed by the event (as the
Stripe handler does) and writes what it does to LOG_DIR:

- `ready-NAME` once the store is open;
- a line `started EVENT NAME` in `started.log` when it begins an event, and
  `finished EVENT NAME` in `finished.log` when the run is stored;
- for an event whose body is `hang` on its first attempt: `hanging-NAME`, then it
  waits (the test kills it with SIGKILL there).
SIGTERM stops it after the event in hand.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from datetime import timedelta
from pathlib import Path

from bot.service import event_run_id
from bot.store import Claimed, RunRecord, Store
from bot.worker import Outcome, Worker


def append(path: Path, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


def main(url: str, name: str, lease_seconds: str, log_dir: str) -> None:
    logs = Path(log_dir)
    store = Store.open(url)

    def job(claimed: Claimed) -> Outcome:
        append(logs / "started.log", f"started {claimed.event_id} {name}")
        if claimed.body == "hang" and claimed.attempts == 1:
            (logs / f"hanging-{name}").touch()
            threading.Event().wait(120)  # killed here; the bound only keeps a stray process from living on
        run_id = event_run_id(claimed.provider, claimed.event_id)
        record = RunRecord(run_id, "2026-10-01", "2026-11-01", "2026-10", "cfg", "1", {"event": claimed.event_id}, [])
        store.start_run(record)
        store.save_run(record, {"keys": 0}, [])
        append(logs / "finished.log", f"finished {claimed.event_id} {name}")
        return Outcome("done", run_id)

    worker = Worker(
        store, {("test", "job"): job}, name=name, lease=timedelta(seconds=float(lease_seconds)), renewer=store.sibling
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    (logs / f"ready-{name}").touch()
    worker.run(stop, idle=0.02)
    store.close()


if __name__ == "__main__":
    main(*sys.argv[1:5])
