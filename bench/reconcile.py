"""The benchmark: a whole `recon reconcile` run against its floor and its naive alternative.

    .venv/bin/python bench/reconcile.py [--data bench/data/10m] [--repeat 3] [--repeat-slow 1]

On the book `bench/generate.py` makes (10M raw events, 500,000 customer × meter keys for
one month), in one run, it measures:

1. the floor: DuckDB alone (a fresh connection with the product's settings) scanning the raw
   events, grouping them by customer × meter × month and FULL OUTER joining that with the
   metered and invoiced aggregates, fetching the 500k joined rows; Parquet and CSV;
2. a straightforward pure-Python reading of the raw CSV (csv module, Decimal, dicts) on its
   first `--python-rows` rows, extrapolated linearly to the whole file;
3. the whole `recon reconcile` run as a child process, with a fresh SQLite store each time
   (wall time and the child's peak RSS); Parquet and CSV;
4. the stages of the run in this process: reading metered and invoice lines, the DuckDB
   aggregation of raw events, hashing the inputs, then, repeatedly, the match and
   classification of the 500k keys alone (`rules.reconcile.reconcile`; the grouping of the
   billing side, which a run does while DuckDB scans, also alone), the store write
   (`bot.service.save`: lines made, serialized once, inserted) and the JSON report the CLI
   writes from the stored lines.

It prints one table and the ratios the targets use. It is a hand-run script: the tests never
time anything. The host is noisy, so it quotes medians and compares only what it ran itself.
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import platform
import re
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import duckdb  # noqa: E402

PERIOD = "2026-10"
GB = 1024**3
MB = 1024**2

TARGET_FLOOR_RATIO = 3.0  # whole run / DuckDB floor, at most
TARGET_PYTHON_RATIO = 10.0  # pure Python / whole run, at least
TARGET_PEAK_BYTES = 1.5 * GB  # whole run's peak RSS, below
TARGET_MATCH_SECONDS = 2.0  # match + classification of 500k keys, below


# -- measuring --------------------------------------------------------------------------


@dataclass
class Figure:
    name: str
    times: list[float] = field(default_factory=list)
    peak: int | None = None  # bytes
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def spread(self) -> str:
        if len(self.times) < 2:
            return ""
        return f"{min(self.times):.2f}–{max(self.times):.2f}"


FIGURES: list[Figure] = []


def record(figure: Figure) -> Figure:
    FIGURES.append(figure)
    shown = f"{figure.median:8.2f} s"
    if figure.peak:
        shown += f"   peak {figure.peak / MB:,.0f} MB"
    print(f"  {figure.name:<52} {shown}  {figure.note}", flush=True)
    return figure


def rss_now() -> int:
    return _status("VmRSS")


def _status(field_name: str) -> int:
    text = Path("/proc/self/status").read_text()
    found = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.M)
    return int(found[1]) * 1024 if found else 0


def reset_peak() -> bool:
    """Reset this process's peak RSS (Linux `clear_refs` 5), so a stage's own peak shows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss() -> int:
    return _status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed(fn: Callable[[], Any], repeat: int, before: Callable[[], None] | None = None) -> tuple[list[float], int, Any]:
    """Run `fn` `repeat` times; wall times, the peak RSS over the runs, the last result."""
    times, result = [], None
    peak = 0
    for _ in range(repeat):
        result = None
        if before:
            before()
        gc.collect()
        reset_peak()
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        peak = max(peak, peak_rss())
    return times, peak, result


# -- 1. the DuckDB floor ----------------------------------------------------------------


def floor_connection() -> duckdb.DuckDBPyConnection:
    """A fresh connection with the settings `connectors.files.connect` uses (threads default)."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute("SET memory_limit = '1GB'")
    con.execute("SET preserve_insertion_order = false")
    return con


def relation(path: Path) -> str:
    if path.suffix == ".parquet":
        return f"read_parquet('{path}')"
    return f"read_csv('{path}', header = true, all_varchar = true)"


def floor_sql(raw: Path, metered: Path, invoiced: Path) -> str:
    q = "DECIMAL(38,12)"
    return f"""
    WITH raw AS (
        SELECT customer_id, meter, date_trunc('month', CAST("timestamp" AS TIMESTAMPTZ)) AS month,
               sum(CAST(quantity AS {q})) AS raw_quantity, count(*) AS events
        FROM {relation(raw)} GROUP BY ALL
    ),
    metered AS (
        SELECT customer_id, meter, date_trunc('month', CAST(period_start AS TIMESTAMPTZ)) AS month,
               sum(CAST(quantity AS {q})) AS metered_quantity
        FROM {relation(metered)} GROUP BY ALL
    ),
    invoiced AS (
        SELECT customer_id, meter, date_trunc('month', CAST(period_start AS TIMESTAMPTZ)) AS month,
               sum(CAST(quantity AS {q})) AS invoiced_quantity, sum(CAST(amount AS {q})) AS invoiced_amount
        FROM {relation(invoiced)} GROUP BY ALL
    )
    SELECT customer_id, meter, CAST(month AS DATE) AS month, raw_quantity, events,
           metered_quantity, invoiced_quantity, invoiced_amount
    FROM raw FULL OUTER JOIN metered USING (customer_id, meter, month)
             FULL OUTER JOIN invoiced USING (customer_id, meter, month)
    """


def measure_floor(data: Path, ext: str, repeat: int) -> Figure:
    sql = floor_sql(data / f"raw_events.{ext}", data / f"metered.{ext}", data / f"invoiced.{ext}")

    fetching: list[float] = []

    def run() -> int:
        con = floor_connection()
        cursor = con.execute(sql)
        start = time.perf_counter()
        rows = cursor.fetchall()
        fetching.append(time.perf_counter() - start)
        con.close()
        return len(rows)

    times, peak, rows = timed(run, repeat)
    threads = floor_connection().execute("SELECT current_setting('threads')").fetchone()[0]
    note = (
        f"{rows:,} joined rows fetched as Python tuples (the fetch alone: {statistics.median(fetching):.2f} s); "
        f"{threads} threads"
    )
    record(Figure(f"DuckDB floor, {ext}", times, peak, note))

    def arrow() -> int:  # the same query, its rows handed over as Arrow columns, no Python object each
        con = floor_connection()
        rows = con.sql(sql).to_arrow_table().num_rows
        con.close()
        return rows

    times, peak, rows = timed(arrow, repeat)
    return record(
        Figure(
            f"DuckDB floor fetched as Arrow, {ext}",
            times,
            peak,
            f"{rows:,} joined rows as Arrow columns: the stricter floor (a run needs Python values per key)",
        )
    )


# -- 2. pure Python ---------------------------------------------------------------------


def pure_python_aggregate(path: Path, limit: int, grace: timedelta = timedelta(hours=48)) -> tuple[int, int]:
    """What a straightforward Python reader does: csv rows, Decimal sums in dicts, keyed by
    customer × meter × month, duplicates dropped by event id, late units set aside."""
    totals: dict[tuple[str, str, int, int], Decimal] = {}
    late: dict[tuple[str, str, int, int], Decimal] = {}
    seen: set[str] = set()
    cutoffs: dict[tuple[int, int], datetime] = {}
    rows = 0
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        at = {name: i for i, name in enumerate(header)}
        i_id, i_cus, i_met, i_ts, i_qty = (at[c] for c in ("event_id", "customer_id", "meter", "timestamp", "quantity"))
        i_rcv = at.get("received_at")
        for row in reader:
            if rows >= limit:
                break
            rows += 1
            event_id = row[i_id]
            if event_id in seen:
                continue
            seen.add(event_id)
            ts = datetime.fromisoformat(row[i_ts]).astimezone(UTC)
            quantity = Decimal(row[i_qty])
            key = (row[i_cus], row[i_met], ts.year, ts.month)
            totals[key] = totals.get(key, Decimal(0)) + quantity
            if i_rcv is not None and row[i_rcv]:
                month = (ts.year, ts.month)
                cutoff = cutoffs.get(month)
                if cutoff is None:
                    following = datetime(ts.year + ts.month // 12, ts.month % 12 + 1, 1, tzinfo=UTC)
                    cutoff = cutoffs[month] = following + grace
                if datetime.fromisoformat(row[i_rcv]) > cutoff:
                    late[key] = late.get(key, Decimal(0)) + quantity
    return rows, len(totals)


def count_rows(data: Path) -> int:
    parquet = data / "raw_events.parquet"
    if parquet.exists():
        return duckdb.connect().execute(f"SELECT count(*) FROM read_parquet('{parquet}')").fetchone()[0]
    with (data / "raw_events.csv").open("rb") as handle:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 24), b"")) - 1


def measure_pure_python(data: Path, limit: int, repeat: int) -> Figure:
    total = count_rows(data)
    limit = min(limit, total)
    times, _, (rows, keys) = timed(lambda: pure_python_aggregate(data / "raw_events.csv", limit), repeat)
    scale = total / rows
    figure = Figure(
        "pure Python csv + Decimal + dicts, csv",
        [t * scale for t in times],
        note=f"first {rows:,} rows in {statistics.median(times):.2f} s, ×{scale:.2f} to {total:,} rows "
        "(linear extrapolation)",
    )
    return record(figure)


# -- 3. the whole run -------------------------------------------------------------------


def measure_whole_run(data: Path, ext: str, repeat: int) -> Figure:
    recon = ROOT / ".venv" / "bin" / "recon"
    if not recon.exists():
        recon = Path(shutil.which("recon") or "recon")
    config = data / f"recon-{ext}.toml"
    times, peaks, summary = [], [], ""
    for _ in range(repeat):
        with tempfile.TemporaryDirectory(prefix="recon-bench-") as tmp:
            database = Path(tmp) / "recon.db"
            out = Path(tmp) / "report.json"
            env = {**os.environ, "RECON_DATABASE_URL": f"sqlite:///{database}"}
            command = [
                str(recon),
                "reconcile",
                "--config",
                str(config),
                "--period",
                PERIOD,
                "--format",
                "json",
                "--out",
                str(out),
            ]
            with open(Path(tmp) / "stderr", "w+b") as err:
                start = time.perf_counter()
                child = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
                _, status, usage = os.wait4(child.pid, 0)
                elapsed = time.perf_counter() - start
                child.returncode = os.waitstatus_to_exitcode(status)
                err.seek(0)
                message = err.read().decode(errors="replace").strip()
            if child.returncode != 0:
                raise SystemExit(f"recon reconcile ({ext}) exited {child.returncode}: {message}")
            times.append(elapsed)
            peaks.append(usage.ru_maxrss * 1024)
            summary = stored_summary(database, out)
    return record(Figure(f"whole `recon reconcile` run, {ext}", times, max(peaks), summary))


def stored_summary(database: Path, out: Path) -> str:
    """Proof that the run was stored: its lines in the store, its report written."""
    with sqlite3.connect(database) as con:
        runs = con.execute("SELECT count(*) FROM runs").fetchone()[0]
        lines = con.execute("SELECT coalesce(sum(lines), 0) FROM run_customers").fetchone()[0]
        breaks = con.execute("SELECT count(*) FROM discrepancies").fetchone()[0]
    con.close()
    return (
        f"{runs} run, {lines:,} lines and {breaks:,} discrepancies stored; "
        f"{out.stat().st_size / MB:,.0f} MB JSON report, {database.stat().st_size / MB:,.0f} MB database"
    )


# -- 4. the stages, in this process -------------------------------------------------------


def measure_stages(data: Path, ext: str, repeat: int, other_ext: str | None) -> dict[str, Figure]:
    from bot import render
    from bot.cli import resolve_sources
    from bot.service import save
    from bot.store import Store
    from connectors.files import FileBilling, RawEventsFile
    from rules.config import parse_config
    from rules.match import add_raw, join_billing
    from rules.periods import parse_period
    from rules.reconcile import judge_all, reconcile, run_id_for
    from rules.report import report_head, stored_lines
    from rules.timeline import build_timeline

    config_path = data / f"recon-{ext}.toml"
    config = parse_config(config_path.read_text(encoding="utf-8"))
    sources = resolve_sources(config, config_path, None, None, None)
    periods = (parse_period(PERIOD, config.period.zone),)
    timeline = build_timeline(periods, config.meters, config.period.grace)
    figures: dict[str, Figure] = {}

    def billing_of(metered: Path, invoiced: Path) -> Callable[[], tuple[list[Any], list[Any]]]:
        def read() -> tuple[list[Any], list[Any]]:
            billing = FileBilling(metered, invoiced)
            return list(billing.metered()), list(billing.invoiced())

        return read

    def aggregate_of(raw: Path) -> Callable[[], list[Any]]:
        return lambda: RawEventsFile(raw).aggregate(timeline, config.evidence_limit, config.period.timezone)

    times, peak, (metered, lines) = timed(billing_of(sources.metered, sources.invoiced), 1)
    figures["billing"] = record(
        Figure(
            f"  read metered + invoice lines (FileBilling), {ext}",
            times,
            peak,
            f"{len(metered):,} metered rows, {len(lines):,} invoice lines",
        )
    )
    times, peak, aggregates = timed(aggregate_of(sources.raw), 1)
    figures["aggregate"] = record(
        Figure(
            f"  raw aggregation (RawEventsFile.aggregate), {ext}",
            times,
            peak,
            f"{len(aggregates):,} aggregates",
        )
    )
    if other_ext:
        other = data / f"raw_events.{other_ext}"
        times, peak, _ = timed(billing_of(data / f"metered.{other_ext}", data / f"invoiced.{other_ext}"), 1)
        figures["billing_other"] = record(
            Figure(f"  read metered + invoice lines (FileBilling), {other_ext}", times, peak)
        )
        times, peak, _ = timed(aggregate_of(other), 1)
        figures["aggregate_other"] = record(
            Figure(f"  raw aggregation (RawEventsFile.aggregate), {other_ext}", times, peak)
        )

    def fingerprints() -> dict[str, str]:
        billing = FileBilling(sources.metered, sources.invoiced)
        return {"raw": RawEventsFile(sources.raw).fingerprint(), "billing": billing.fingerprint()}

    times, peak, inputs = timed(fingerprints, 1)
    figures["fingerprint"] = record(
        Figure(
            f"  input SHA-256 (overlaps the scan in a run), {ext}",
            times,
            peak,
        )
    )
    run_id = run_id_for(config.fingerprint, inputs, periods, frozenset())

    figures.update(measure_run_stages(config, sources, timeline, periods, inputs, run_id, repeat, ext))
    baseline = rss_now()
    print(f"  (RSS with the inputs in memory: {baseline / MB:,.0f} MB; the peaks below include it)", flush=True)

    holder: dict[str, Any] = {}

    def match() -> Any:
        return reconcile(config, timeline, aggregates, metered, lines, run_id)

    def drop(name: str) -> Callable[[], None]:
        return lambda: holder.pop(name, None)

    times, peak, (report, joined) = timed(match, repeat, drop("report"))
    figures["match"] = record(
        Figure(
            "  match + classification of the keys (reconcile())",
            times,
            peak,
            f"{len(report.lines):,} keys",
        )
    )
    holder["report"] = report
    # The same work as a run splits it: the billing side is grouped while DuckDB scans.
    times, _, billed = timed(lambda: join_billing(timeline, metered, lines), repeat)
    figures["join_billing"] = record(Figure("    of which: grouping the billing side (overlaps the scan)", times))
    del billed

    def grouped() -> None:  # the billing side grouped, as when the scan ends in a run
        holder.pop("after", None)
        holder["billed"] = join_billing(timeline, metered, lines)

    def after_aggregation() -> Any:
        return judge_all(config, timeline, add_raw(holder.pop("billed"), timeline, aggregates), run_id)

    times, _, holder["after"] = timed(after_aggregation, repeat, grouped)
    figures["after_aggregation"] = record(
        Figure("    of which, after the scan: the raw aggregates added, every key judged", times)
    )
    holder.pop("after", None)
    extra = {"out_of_scope": {"metered": joined.out_of_scope_metered, "invoice_lines": joined.out_of_scope_lines}}
    del joined
    head = report_head(report, extra)

    with tempfile.TemporaryDirectory(prefix="recon-bench-") as tmp:
        counter = iter(range(1_000_000))
        stores: list[Store] = []

        out = Path(tmp) / "report.json"

        def store() -> bool:
            # As `recon reconcile --format json --out` does it: the report is written from the
            # lines' texts as they are stored (render.JsonSpool), and moved into place at the end.
            stores.append(Store.open(f"sqlite:///{Path(tmp) / f'store-{next(counter)}.db'}"))
            with render.JsonSpool(out) as spool:
                spool.begin(head)
                stored = save(
                    stores[-1], head, stored_lines(report), config, inputs, periods, frozenset(), seen=spool.page
                )
                spool.finish()
                spool.deliver()
            return stored

        times, peak, stored = timed(store, repeat)
        assert stored, "the run was not stored"
        figures["save"] = record(
            Figure(
                "  store write: lines made, serialized once, inserted, and written as the JSON report",
                times,
                peak,
                f"{out.stat().st_size / MB:,.0f} MB JSON",
            )
        )

        def write() -> int:
            with out.open("w", encoding="utf-8") as handle:
                render.write_json(head, stores[-1].line_texts(run_id), handle)
            return out.stat().st_size

        times, peak, size = timed(write, repeat)
        figures["json"] = record(
            Figure(
                "  JSON report read back from the store and written",
                times,
                peak,
                f"{size / MB:,.0f} MB (a run stored before, GET /api/runs/<id>; not part of a first run)",
            )
        )
    return figures


def measure_run_stages(
    config: Any,
    sources: Any,
    timeline: Any,
    periods: Any,
    inputs: dict[str, str],
    run_id: str,
    repeat: int,
    ext: str,
) -> dict[str, Figure]:
    """The stages of a stored run of the whole book as `recon reconcile` does them: the billing
    side read as columns (during the scan), the raw aggregates as an Arrow table, then every key
    judged in bulk (bot.bulk), then the lines made a page at a time as the store writes them
    with the JSON report beside it."""
    from bot import render
    from bot.bulk import judge_book
    from bot.service import save
    from bot.store import Store
    from connectors.files import FileBilling, RawEventsFile
    from rules.report import head_json

    figures: dict[str, Figure] = {}
    times, peak, columns = timed(lambda: FileBilling(sources.metered, sources.invoiced).columns(), 1)
    figures["columns"] = record(
        Figure(f"  read metered + invoice lines as columns (overlaps the scan), {ext}", times, peak)
    )
    raw = RawEventsFile(sources.raw)
    times, peak, table = timed(
        lambda: raw.aggregate_table(timeline, config.evidence_limit, config.period.timezone), repeat
    )
    figures["aggregate_table"] = record(
        Figure(f"  raw aggregation as a run does it (aggregate_table), {ext}", times, peak)
    )
    book = {"raw": table, "billing": columns}
    del table, columns

    def judge() -> Any:
        return judge_book(config, timeline, book["raw"], *book["billing"])

    times, peak, judged = timed(judge, repeat)
    figures["bulk_judge"] = record(
        Figure("  match + classification after the scan: every key judged (bot.bulk.judge_book)", times, peak)
    )

    def with_lines() -> int:
        return sum(len(page.classes) for page in judge().pages.pages)

    times, peak, keys = timed(with_lines, repeat)
    figures["bulk"] = record(
        Figure("    the same with every line's text made, a page at a time", times, peak, f"{keys:,} keys")
    )
    head = head_json(run_id, periods, judged.summary)
    with tempfile.TemporaryDirectory(prefix="recon-bench-") as tmp:
        counter = iter(range(1_000_000))
        out = Path(tmp) / "report.json"
        holder: dict[str, Any] = {}

        def fresh() -> None:
            holder["judged"] = judge()

        def store() -> bool:
            target = Store.open(f"sqlite:///{Path(tmp) / f'store-{next(counter)}.db'}")
            with render.JsonSpool(out) as spool:
                spool.begin(head)
                pages = holder.pop("judged").pages
                stored = save(target, head, pages, config, inputs, periods, frozenset(), seen=spool.page)
                spool.finish()
                spool.deliver()
            target.close()
            return stored

        times, peak, stored = timed(store, repeat, fresh)
        assert stored, "the run was not stored"
        figures["bulk_store"] = record(
            Figure(
                "  store write, a run's way: lines made a page at a time, stored, written as the JSON report",
                times,
                peak,
                f"{out.stat().st_size / MB:,.0f} MB JSON",
            )
        )
    return figures


# -- the report -------------------------------------------------------------------------


def machine() -> str:
    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M)
        cpu = found[1].strip() if found else cpu
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    return (
        f"{os.cpu_count()} cores ({cpu}), {memory:.1f} GB RAM, Python {platform.python_version()}, "
        f"DuckDB {duckdb.__version__}, {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}"
    )


def print_table() -> None:
    print()
    print("| measurement | runs | median s | min–max s | peak RSS | note |")
    print("|---|---:|---:|---:|---:|---|")
    for f in FIGURES:
        peak = f"{f.peak / MB:,.0f} MB" if f.peak else "—"
        print(f"| {f.name.strip()} | {len(f.times)} | {f.median:.2f} | {f.spread() or '—'} | {peak} | {f.note} |")


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def print_targets(by_name: dict[str, Figure], stages: dict[str, Figure]) -> None:
    print()
    print("| target | figure | verdict |")
    print("|---|---|---|")
    for ext in ("parquet", "csv"):
        run = by_name.get(f"whole `recon reconcile` run, {ext}")
        floors = (
            (f"DuckDB floor, {ext}", f"whole run / DuckDB floor ≤ {TARGET_FLOOR_RATIO:g}×, {ext}"),
            (f"DuckDB floor fetched as Arrow, {ext}", f"(the same against the floor fetched as Arrow, {ext})"),
        )
        for name, label in floors:
            floor = by_name.get(name)
            if run and floor:
                ratio = run.median / floor.median
                print(
                    f"| {label} | {run.median:.2f} s / {floor.median:.2f} s = {ratio:.1f}× | "
                    f"{verdict(ratio <= TARGET_FLOOR_RATIO)} |"
                )
    python = by_name.get("pure Python csv + Decimal + dicts, csv")
    floor = by_name.get("DuckDB floor, csv")
    if python and floor:
        print(
            f"| (the best this ratio can be: pure Python / DuckDB floor, csv) | "
            f"{python.median:.2f} s / {floor.median:.2f} s = {python.median / floor.median:.2f}× | — |"
        )
    for ext in ("csv", "parquet"):
        run = by_name.get(f"whole `recon reconcile` run, {ext}")
        if python and run:
            ratio = python.median / run.median
            print(
                f"| pure Python (csv) / whole run ≥ {TARGET_PYTHON_RATIO:g}×, {ext} run | "
                f"{python.median:.2f} s / {run.median:.2f} s = {ratio:.2f}× | "
                f"{verdict(ratio >= TARGET_PYTHON_RATIO)} |"
            )
    for ext in ("parquet", "csv"):
        run = by_name.get(f"whole `recon reconcile` run, {ext}")
        if run and run.peak:
            print(
                f"| peak memory < {TARGET_PEAK_BYTES / GB:g} GB, {ext} run | {run.peak / GB:.2f} GB | "
                f"{verdict(run.peak < TARGET_PEAK_BYTES)} |"
            )
    judged, bulk = stages.get("bulk_judge"), stages.get("bulk")
    if judged and bulk:
        print(
            f"| match + classification of the {bulk.note} < {TARGET_MATCH_SECONDS:g} s, after the aggregation, "
            f"as a run does it (bot.bulk) | {judged.median:.2f} s | {verdict(judged.median < TARGET_MATCH_SECONDS)} |"
        )
        print(f"| (the same with every line's text made) | {bulk.median:.2f} s | — |")
    match, after = stages.get("match"), stages.get("after_aggregation")
    if match:
        print(
            f"| (key by key, rules.reconcile: the {match.note}, all of it) | "
            f"{match.median:.2f} s | {verdict(match.median < TARGET_MATCH_SECONDS)} |"
        )
    if after:
        print(
            f"| (key by key, after the aggregation) | "
            f"{after.median:.2f} s | {verdict(after.median < TARGET_MATCH_SECONDS)} |"
        )


def print_breakdown(by_name: dict[str, Figure], stages: dict[str, Figure], ext: str) -> None:
    run = by_name.get(f"whole `recon reconcile` run, {ext}")
    if not run or not stages:
        return
    parts = [
        ("aggregate_table", "raw aggregation (DuckDB, an Arrow table)"),
        ("bulk_judge", "match + classification (bot.bulk)"),
        ("bulk_store", "lines made, stored, and the JSON report"),
    ]
    print()
    print(
        f"Where the {ext} run's {run.median:.1f} s go (stages measured in-process; hashing and reading the "
        "billing side overlap the scan when --period is given):"
    )
    accounted = 0.0
    for key, label in parts:
        seconds = stages[key].median
        accounted += seconds
        print(f"  {label:<50} {seconds:7.2f} s  {100 * seconds / run.median:5.1f} %")
    rest = run.median - accounted
    print(f"  {'the rest (start-up, imports, config, noise)':<50} {rest:7.2f} s  {100 * rest / run.median:5.1f} %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "bench" / "data" / "10m")
    parser.add_argument("--repeat", type=int, default=3, help="runs of the fast measurements (median) [3]")
    parser.add_argument("--repeat-slow", type=int, default=1, help="runs of the slow ones: pure Python, whole runs [1]")
    parser.add_argument(
        "--python-rows", type=int, default=1_000_000, help="rows the pure-Python reader reads [1,000,000]"
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=["floor", "python", "run", "stages"],
        help="leave out a group of measurements (repeatable)",
    )
    args = parser.parse_args()
    data = args.data.resolve()
    needed = [data / f"{name}.{ext}" for name in ("raw_events", "metered", "invoiced") for ext in ("csv", "parquet")]
    if not all(p.exists() for p in needed):
        raise SystemExit(f"{data}: no book here; make one with .venv/bin/python bench/generate.py --out {args.data}")

    print(f"machine: {machine()}")
    print(f"book: {data} ({count_rows(data):,} raw event rows)")
    print(f"repeats: {args.repeat} (fast), {args.repeat_slow} (slow); medians quoted\n", flush=True)
    stages: dict[str, Figure] = {}
    if "floor" not in args.skip:
        measure_floor(data, "parquet", args.repeat)
        measure_floor(data, "csv", args.repeat)
    if "python" not in args.skip:
        measure_pure_python(data, args.python_rows, args.repeat_slow)
    if "run" not in args.skip:
        measure_whole_run(data, "parquet", args.repeat_slow)
        measure_whole_run(data, "csv", args.repeat_slow)
    if "stages" not in args.skip:
        print("  stages of the run, in this process (parquet inputs):", flush=True)
        stages = measure_stages(data, "parquet", args.repeat, "csv")

    by_name = {f.name: f for f in FIGURES}
    print_table()
    print_targets(by_name, stages)
    print_breakdown(by_name, stages, "parquet")


if __name__ == "__main__":
    main()
