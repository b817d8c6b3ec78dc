"""Webhook intake benchmark: the product's POST /webhooks/stripe against a bare floor.

Run by hand, from the repository root:

    .venv/bin/python bench/intake.py                 # the full run, about 2 minutes
    .venv/bin/python bench/intake.py --quick         # a smoke run with fewer requests
    .venv/bin/python bench/intake.py --database-url postgresql://postgres@127.0.0.1:5432/test

With `--database-url postgresql://...` both servers store into PostgreSQL instead, each run
in a schema of its own in that database (dropped afterwards unless `--keep`): the product
through its psycopg pool, the floor with one plain psycopg connection per gunicorn worker
in autocommit (one INSERT, one round trip, per request).

One run starts two servers under gunicorn with the Procfile's settings (2 sync
workers, bound to 127.0.0.1 on a free port), each with a fresh temporary SQLite file:

- product: `bot.app:create_app()` exactly as the Procfile's `web` entry, after `recon migrate`;
- floor:   `create_floor_app()` below, a bare Flask app that only checks the HMAC
  (hmac.compare_digest) and inserts the body into SQLite (WAL, synchronous=NORMAL), or
  into PostgreSQL with a bare psycopg connection.

This process is the load generator (a second process, on 127.0.0.1). Each request is the
fixture `event_invoice_created.json` with a distinct event id, padded in
`data.object.metadata` to a fixed size, signed as Stripe signs at send time. Phases,
run for product and floor side by side:

- open loop at a fixed rate (default 300 req/s, 3000 requests): each request is sent on
  its schedule by one of 32 sender threads, each on its own connection, so a slow answer
  does not hold back later sends; latency counts from the scheduled send time to the end
  of the response (the worst send lag behind schedule is reported);
- closed loop with 1, 4 and 8 concurrent connections (default 5000 requests each).

The fixture alone is 3,978 bytes as compact JSON, so events are padded to 4096 bytes by
default (`--body-bytes`); ids are `evt_bench_<phase>_<n>`, fixed width.

After each phase the inbox is read back: every sent event id must be stored exactly once.
The report is a markdown table with the verdict against the targets: product throughput
>= 70% of the floor's, product p99 at 300 req/s < 20 ms.

gunicorn's sync worker closes the connection after each response, so every request is a
new TCP connection (as a webhook sender's usually is). The load generator (blocking sockets
in threads, ~100 µs of CPU per request here; asyncio cost ~250) shares the two cores with
the servers; its CPU per request is reported so that can be judged. The machine is noisy:
run it 2-3 times and quote medians. `--keep` keeps the databases and gunicorn logs.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import math
import os
import platform
import queue
import resource
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT.parent / "shared" / "fixtures" / "stripe" / "event_invoice_created.json"
SECRET = "whsec_bench_intake_secret"
TOLERANCE_SECONDS = 300
PRODUCT_APP = "bot.app:create_app()"
FLOOR_APP = "intake:create_floor_app()"
SLOW_MS = 5.0  # a request slower than this counts in the stalls column

TARGET_SHARE_OF_FLOOR = 70.0  # percent
TARGET_P99_MS = 20.0


# -- the floor: run inside gunicorn's workers ------------------------------------------------


def create_floor_app():  # type: ignore[no-untyped-def]
    """The least a webhook intake can do: check the Stripe HMAC, insert the body, answer 200."""
    from flask import Flask, request

    secret = os.environ["FLOOR_SECRET"].encode()
    if os.environ["FLOOR_DB"].startswith("postgresql://"):
        import psycopg

        db = psycopg.connect(os.environ["FLOOR_DB"], autocommit=True)
        insert = "INSERT INTO floor_inbox (body) VALUES (%s)"
    else:
        db = sqlite3.connect(os.environ["FLOOR_DB"], timeout=30, check_same_thread=False)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        insert = "INSERT INTO floor_inbox (body) VALUES (?)"
    app = Flask("floor")

    @app.get("/readyz")
    def readyz():  # type: ignore[no-untyped-def]
        return "ready"

    @app.post("/webhooks/stripe")
    def receive():  # type: ignore[no-untyped-def]
        body = request.get_data(cache=False)
        if not floor_signature_ok(body, request.headers.get("Stripe-Signature", ""), secret):
            return "invalid signature", 400
        db.execute(insert, (body.decode(),))
        db.commit()
        return "ok"

    return app


def floor_signature_ok(body: bytes, header: str, secret: bytes) -> bool:
    parts = dict(item.split("=", 1) for item in header.split(",") if "=" in item)
    stamp, given = parts.get("t", ""), parts.get("v1", "")
    if not stamp.isdigit() or abs(time.time() - int(stamp)) > TOLERANCE_SECONDS:
        return False
    expected = hmac.new(secret, stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, given)


def create_floor_db(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("CREATE TABLE floor_inbox (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
    db.commit()
    db.close()


# -- PostgreSQL: a schema of its own for one run -----------------------------------------------


def pg_schema_url(url: str, schema: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"


def pg_connect(url: str):  # type: ignore[no-untyped-def]
    import psycopg

    return psycopg.connect(url, autocommit=True)


# -- events: built before a phase, signed at send time ----------------------------------------


def event_template(size: int) -> tuple[str, str]:
    """The fixture as compact JSON around an id placeholder, padded in metadata to `size` bytes."""
    event = json.loads(FIXTURE.read_text())
    event["type"] = "invoice.created"
    event["id"] = "@ID@"
    event["data"]["object"]["metadata"] = {"bench_padding": ""}
    bare = len(json.dumps(event, separators=(",", ":"))) - len("@ID@") + len(event_id("x", 0))
    event["data"]["object"]["metadata"]["bench_padding"] = "x" * max(0, size - bare)
    head, tail = json.dumps(event, separators=(",", ":")).split("@ID@")
    return head, tail


def event_id(phase: str, number: int) -> str:
    return f"evt_bench_{phase}_{number:07d}"


def bodies(template: tuple[str, str], phase: str, count: int) -> list[tuple[str, bytes]]:
    head, tail = template
    ids = [event_id(phase, n) for n in range(count)]
    return [(i, f"{head}{i}{tail}".encode()) for i in ids]


def signature(body: bytes, secret: str = SECRET) -> str:
    """Stripe's scheme: HMAC-SHA256 of `{t}.{body}` keyed with the whole `whsec_` string."""
    stamp = str(int(time.time()))
    digest = hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={stamp},v1={digest}"


# -- HTTP: one connection per request, blocking sockets in threads ---------------------------


def post(port: int, body: bytes, timeout: float = 30.0) -> int:
    """POST a freshly signed event; the HTTP status, or 0 when the request failed."""
    head = (
        f"POST /webhooks/stripe HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"Stripe-Signature: {signature(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
            conn.sendall(head + body)
            answer = b""
            while chunk := conn.recv(65536):  # the sync worker closes the connection after answering
                answer += chunk
        return int(answer.split(b" ", 2)[1])
    except (OSError, IndexError, ValueError):
        return 0


@dataclass
class Phase:
    """What one phase sent, what came back (by request number, in send order) and what was stored."""

    name: str
    target: str
    ids: list[str]
    latencies: list[float]  # seconds
    statuses: list[int]
    elapsed: float
    send_lag_max: float  # open loop: the worst delay between a request's schedule and its send
    client_cpu: float  # seconds of this process's CPU per request
    stored: int
    missing: int
    duplicated: int

    @property
    def rps(self) -> float:
        return len(self.ids) / self.elapsed if self.elapsed else 0.0

    @property
    def non_2xx(self) -> int:
        return sum(1 for s in self.statuses if not 200 <= s < 300)

    def percentile_ms(self, q: float) -> float:
        """Nearest-rank percentile, in milliseconds."""
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    def stall_episodes(self, apart: int = 20) -> list[int]:
        """First request number of each run of slow requests (slow ones fewer than `apart` apart join)."""
        slow = [n for n, lat in enumerate(self.latencies) if lat * 1000 > SLOW_MS]
        return [n for k, n in enumerate(slow) if k == 0 or n - slow[k - 1] >= apart]


@dataclass
class Sent:
    latencies: list[float]
    statuses: list[int]
    elapsed: float
    send_lag_max: float = 0.0


def open_loop(port: int, events: list[tuple[str, bytes]], rate: float, senders: int = 32) -> Sent:
    """Send on schedule from a pool of `senders` connections; latency counts from the scheduled time."""
    count = len(events)
    latencies, statuses, lags = [0.0] * count, [0] * count, [0.0] * count
    jobs: queue.SimpleQueue = queue.SimpleQueue()

    def sender() -> None:
        while (job := jobs.get()) is not None:
            n, body, due = job
            lags[n] = time.perf_counter() - due
            statuses[n] = post(port, body)
            latencies[n] = time.perf_counter() - due

    threads = start_threads(sender, senders)
    start = time.perf_counter() + 0.05
    for n, (_, body) in enumerate(events):
        due = start + n / rate
        if (pause := due - time.perf_counter()) > 0:
            time.sleep(pause)
        jobs.put((n, body, due))
    for _ in threads:
        jobs.put(None)
    for thread in threads:
        thread.join()
    return Sent(latencies, statuses, time.perf_counter() - start, max(lags))


def closed_loop(port: int, events: list[tuple[str, bytes]], connections: int) -> Sent:
    """`connections` clients, each sending its next request as soon as its last one is answered."""
    latencies, statuses = [0.0] * len(events), [0] * len(events)
    numbered = iter(enumerate(events))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                n, (_, body) = next(numbered, (None, (None, b"")))
            if n is None:
                return
            began = time.perf_counter()
            statuses[n] = post(port, body)
            latencies[n] = time.perf_counter() - began

    start = time.perf_counter()
    for thread in start_threads(client, connections):
        thread.join()
    return Sent(latencies, statuses, time.perf_counter() - start)


def start_threads(work: Callable[[], None], count: int) -> list[threading.Thread]:
    threads = [threading.Thread(target=work, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads


Send = Callable[[int, list[tuple[str, bytes]]], Sent]


def drive(target: Target, name: str, events: list[tuple[str, bytes]], send: Send) -> Phase:
    """Run one phase against one server, then read its inbox back."""
    ids = [i for i, _ in events]
    before = cpu_seconds()
    sent = send(target.port, events)
    client_cpu = (cpu_seconds() - before) / len(events)
    stored, missing, duplicated = target.check(ids)
    return Phase(
        name,
        target.name,
        ids,
        sent.latencies,
        sent.statuses,
        sent.elapsed,
        sent.send_lag_max,
        client_cpu,
        stored,
        missing,
        duplicated,
    )


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- servers ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Target:
    """A gunicorn server with the Procfile's settings, and the query that reads its inbox back."""

    name: str
    app: str
    db: Path  # the SQLite file; with PostgreSQL, only names the log file
    env: dict[str, str]
    ids_sql: str  # (event_id, count) for each stored id matching a GLOB (SQLite) or LIKE (PostgreSQL) prefix
    pg_url: str | None = None  # set when the server stores into PostgreSQL
    pythonpath: str | None = None
    port: int = 0
    process: subprocess.Popen | None = None
    log: Path | None = None

    def start(self) -> None:
        self.port = free_port()
        self.log = self.db.with_suffix(".log")
        settings = ["--config", str(ROOT / "gunicorn.conf.py"), "--workers", "2"]  # as the Procfile's `web`
        command = [gunicorn(), *settings, "--bind", f"127.0.0.1:{self.port}"]
        if self.pythonpath:
            command += ["--pythonpath", self.pythonpath]
        env = {**os.environ, **self.env}
        with self.log.open("w") as log:
            self.process = subprocess.Popen([*command, self.app], cwd=ROOT, env=env, stdout=log, stderr=log)
        wait_ready(self.port, self.process, self.log)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def check(self, ids: list[str]) -> tuple[int, int, int]:
        """(rows stored for these ids, ids missing, ids stored more than once)."""
        prefix = ids[0].rsplit("_", 1)[0] + "_"
        if self.pg_url:
            with pg_connect(self.pg_url) as db:
                counts = dict(db.execute(self.ids_sql, [prefix.replace("_", "\\_") + "%"]).fetchall())
        else:
            db = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)
            try:
                counts = dict(db.execute(self.ids_sql, [prefix + "*"]).fetchall())
            finally:
                db.close()
        missing = sum(1 for i in ids if i not in counts)
        duplicated = sum(1 for c in counts.values() if c > 1)
        return sum(counts.values()), missing, duplicated


def gunicorn() -> str:
    beside = Path(sys.executable).parent / "gunicorn"
    return str(beside) if beside.exists() else shutil.which("gunicorn") or "gunicorn"


def wait_ready(port: int, process: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"gunicorn exited early ({process.returncode}); see {log}:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"no /readyz on port {port} within {timeout} s; see {log}")


def product(workdir: Path, app: str, pythonpath: str | None, pg_url: str | None = None) -> Target:
    db = workdir / "product.db"
    url = pg_url or f"sqlite:///{db}"
    env = {"RECON_DATABASE_URL": url, "STRIPE_WEBHOOK_SECRET": SECRET}
    recon = Path(sys.executable).parent / "recon"
    subprocess.run([str(recon), "migrate"], cwd=ROOT, env={**os.environ, **env}, check=True, capture_output=True)
    match = "LIKE" if pg_url else "GLOB"
    sql = f"SELECT event_id, count(*) FROM inbox WHERE provider = 'stripe' AND event_id {match} ? GROUP BY event_id"
    if pg_url:
        sql = sql.replace("?", "%s")
    return Target("product", app, db, env, sql, pg_url, pythonpath=pythonpath)


def floor(workdir: Path, pg_url: str | None = None) -> Target:
    db = workdir / "floor.db"
    here = str(Path(__file__).resolve().parent)
    if pg_url:
        with pg_connect(pg_url) as conn:
            conn.execute("CREATE TABLE floor_inbox (id BIGSERIAL PRIMARY KEY, body TEXT NOT NULL)")
        env = {"FLOOR_DB": pg_url, "FLOOR_SECRET": SECRET}
        sql = (
            "SELECT body::json->>'id' AS event_id, count(*) FROM floor_inbox WHERE body::json->>'id' LIKE %s GROUP BY 1"
        )
        return Target("floor", FLOOR_APP, db, env, sql, pg_url, pythonpath=here)
    create_floor_db(db)
    env = {"FLOOR_DB": str(db), "FLOOR_SECRET": SECRET}
    sql = (
        "SELECT json_extract(body, '$.id') AS event_id, count(*) FROM floor_inbox"
        " WHERE json_extract(body, '$.id') GLOB ? GROUP BY 1"
    )
    return Target("floor", FLOOR_APP, db, env, sql, pythonpath=here)


# -- the run ----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> list[Phase]:
    template = event_template(args.body_bytes)
    workdir = Path(tempfile.mkdtemp(prefix="bench-intake-"))
    schema = pg_url = None
    if args.database_url:
        schema = f"bench_intake_{os.getpid()}"
        with pg_connect(args.database_url) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        pg_url = pg_schema_url(args.database_url, schema)
    targets = [product(workdir, args.app, args.pythonpath, pg_url), floor(workdir, pg_url)]
    phases: list[Phase] = []
    try:
        for target in targets:
            target.start()
        print(f"# servers up: {', '.join(f'{t.name} :{t.port}' for t in targets)}; files in {workdir}", file=sys.stderr)
        for name, count, send in plan(args):
            for target in targets:  # side by side, so drift on a noisy host hits both alike
                phase = drive(target, name, bodies(template, name, count), send)
                print(f"# {target.name:8} {describe(phase)}", file=sys.stderr)
                if name != "warmup":
                    phases.append(phase)
                time.sleep(args.pause)
    finally:
        for target in targets:
            target.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
            if schema:
                with pg_connect(args.database_url) as conn:
                    conn.execute(f"DROP SCHEMA {schema} CASCADE")
    return phases


def plan(args: argparse.Namespace) -> list[tuple[str, int, Send]]:
    """(phase name, requests, how to send them); the warm-up is checked but not reported."""
    steps: list[tuple[str, int, Send]] = [("warmup", 200, partial(closed_loop, connections=2))]
    steps.append((f"open{args.rate:g}", args.open_count, partial(open_loop, rate=args.rate)))
    for c in sorted(set(args.connections)):
        steps.append((f"closed{c}", args.closed_count, partial(closed_loop, connections=c)))
    return steps


def describe(p: Phase) -> str:
    return (
        f"{p.name:10} n={len(p.ids)} {p.rps:7.0f} req/s p50 {p.percentile_ms(0.5):6.2f} ms "
        f"p99 {p.percentile_ms(0.99):6.2f} ms max {p.percentile_ms(1.0):7.2f} ms non-2xx {p.non_2xx} "
        f"stored {p.stored} missing {p.missing} dup {p.duplicated}"
    )


# -- the report -------------------------------------------------------------------------------


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    models = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    model = models[0] if models else platform.processor() or "unknown"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"nproc {os.cpu_count()}, {model}, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, load avg {load}"
    )


def stalls(p: Phase) -> str:
    """Runs of requests slower than SLOW_MS, and the median number of requests between them."""
    episodes = p.stall_episodes()
    if len(episodes) < 2:
        return str(len(episodes))
    gaps = sorted(b - a for a, b in zip(episodes, episodes[1:], strict=False))
    return f"{len(episodes)} / {gaps[len(gaps) // 2]}"


def table(phases: list[Phase], body_bytes: int) -> str:
    rows = [
        "| target | phase | requests | req/s | p50 ms | p99 ms | max ms | non-2xx | stalls / every | "
        "stored | missing | dup | client CPU µs/req |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in phases:
        rows.append(
            f"| {p.target} | {p.name} | {len(p.ids)} | {p.rps:.0f} | {p.percentile_ms(0.5):.2f} | "
            f"{p.percentile_ms(0.99):.2f} | {p.percentile_ms(1.0):.2f} | {p.non_2xx} | {stalls(p)} | "
            f"{p.stored} | {p.missing} | {p.duplicated} | {p.client_cpu * 1e6:.0f} |"
        )
    lags = ", ".join(f"{p.target} {1000 * p.send_lag_max:.2f} ms" for p in phases if p.name.startswith("open"))
    notes = [
        f"Each event is {body_bytes} bytes. openR: open loop at R req/s, latency from the scheduled send "
        f"(worst send lag behind schedule: {lags}). closedN: N connections, closed loop.",
        f"stalls / every: runs of requests slower than {SLOW_MS:g} ms, and the median number of requests "
        "between the starts of two runs.",
    ]
    return "\n".join(rows) + "\n\n" + "\n".join(notes)


def verdict(phases: list[Phase], rate: float) -> tuple[str, bool]:
    def best(target: str) -> Phase:
        return max((p for p in phases if p.target == target and p.name.startswith("closed")), key=lambda p: p.rps)

    paced = next(p for p in phases if p.target == "product" and p.name.startswith("open"))
    share = 100 * best("product").rps / best("floor").rps
    p99 = paced.percentile_ms(0.99)
    intact = all(p.missing == 0 and p.duplicated == 0 and p.non_2xx == 0 for p in phases)
    share_ok, p99_ok = share >= TARGET_SHARE_OF_FLOOR, p99 < TARGET_P99_MS
    lines = [
        "| check | figure | target | verdict |",
        "|---|---|---|---|",
        f"| product best throughput / floor best | {best('product').rps:.0f} / {best('floor').rps:.0f} req/s "
        f"({best('product').name} / {best('floor').name}) = {share:.1f}% | ≥ {TARGET_SHARE_OF_FLOOR:g}% | "
        f"{'PASS' if share_ok else 'FAIL'} |",
        f"| product p99 at {rate:g} req/s (open loop) | {p99:.2f} ms | < {TARGET_P99_MS:g} ms | "
        f"{'PASS' if p99_ok else 'FAIL'} |",
        f"| every sent id stored once, all 2xx | {'yes' if intact else 'NO'} | yes | {'PASS' if intact else 'FAIL'} |",
    ]
    return "\n".join(lines), share_ok and p99_ok and intact


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=300.0, help="open-loop requests per second")
    parser.add_argument("--open-count", type=int, default=3000)
    parser.add_argument("--closed-count", type=int, default=5000)
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--body-bytes", type=int, default=4096, help="event size (the fixture alone is ~3.9 KB)")
    parser.add_argument("--pause", type=float, default=1.0, help="seconds of rest between phases")
    parser.add_argument("--app", default=PRODUCT_APP, help="gunicorn app spec for the product (experiments)")
    parser.add_argument("--pythonpath", help="extra gunicorn --pythonpath for --app (experiments)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary databases and logs")
    parser.add_argument("--database-url", help="PostgreSQL database to store into (a schema per run), not SQLite")
    parser.add_argument("--quick", action="store_true", help="600 open-loop and 1000 closed-loop requests")
    args = parser.parse_args(argv)
    if args.quick:
        args.open_count, args.closed_count = 600, 1000
    phases = run(args)
    checks, ok = verdict(phases, args.rate)
    where = "PostgreSQL" if args.database_url else "SQLite"
    print(f"## Webhook intake benchmark ({where})\n\n{machine()}\n\n{table(phases, args.body_bytes)}\n\n{checks}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
