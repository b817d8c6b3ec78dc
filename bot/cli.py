"""The `recon` command line."""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import duckdb
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from bot import render
from bot.config import NotConfigured, Settings, SettingsError
from bot.service import RunResult, SourcePaths, reconcile_files, reconcile_platform
from bot.store import Store, StoreError
from connectors.base import InputError, InvoiceBilling
from connectors.raw import resolve
from rules.config import Config, ConfigError, Schedule, parse_config
from rules.periods import PeriodError, last_closed, parse_periods
from rules.values import parse_instant

USER_ERRORS = (InputError, ConfigError, PeriodError, StoreError, SettingsError, NotConfigured)


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input exits 2 with one line; anything else exits 1 with one line."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except USER_ERRORS as exc:
            click.echo(f"recon: {exc}", err=True)
            sys.exit(2)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - the last line of defence for a CLI
            click.echo(f"recon: unexpected error: {type(exc).__name__}: {exc}", err=True)
            sys.exit(1)

    return wrapper


def load_config(path: Path) -> Config:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file (set RECON_CONFIG or pass --config)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror}") from None
    try:
        return parse_config(text)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


@click.group()
@click.version_option(package_name="overage-recon")
def main() -> None:
    """overage-recon: reconcile raw usage, metered units and invoices."""


@main.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="Config file [env RECON_CONFIG].")
@click.option("--raw", help="Raw events: a file, a pattern or a database URL (overrides [sources] raw).")
@click.option("--metered", type=click.Path(path_type=Path), help="Metered file (overrides [sources] metered).")
@click.option("--invoiced", type=click.Path(path_type=Path), help="Invoice lines file (overrides [sources] invoiced).")
@click.option(
    "--billing",
    type=click.Choice(["files", "stripe", "orb"]),
    help="Read metered units and invoice lines from this platform's API for --period "
    "(default: `stripe:`/`orb:` in [sources], else the files).",
)
@click.option("--period", help="YYYY-MM, or START..END; default: the periods the records name.")
@click.option("--customer", "customers", multiple=True, help="Only this customer (repeatable).")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), help="Write the report here instead of stdout.")
@click.option("--route/--no-route", default=False, help="Route findings (Slack, tickets, watch-list).")
@click.option("--all", "show_all", is_flag=True, help="With --format table, list matched keys too.")
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=100,
    show_default=True,
    help="With --format table, list at most this many keys (0: all).",
)
@user_errors
def reconcile(
    config_path: Path | None,
    raw: str | None,
    metered: Path | None,
    invoiced: Path | None,
    billing: str | None,
    period: str | None,
    customers: tuple[str, ...],
    fmt: str,
    out: Path | None,
    route: bool,
    show_all: bool,
    limit: int,
) -> None:
    """Run one reconciliation and print its report."""
    if out is not None and not out.parent.is_dir():  # said now, not after a long run
        raise InputError(f"--out {out}: no such folder {out.parent}")
    settings = Settings.from_env()
    config_path = config_path or settings.config_path
    config = load_config(config_path)
    periods = parse_periods(period, config.period.zone) if period else None
    store = Store.open(settings.database_url)
    platform = billing_platform(config, billing, metered, invoiced)
    # JSON is written as the run is stored, and delivered once it is committed (render.JsonSpool).
    with render.JsonSpool(out) if fmt == "json" else contextlib.nullcontext() as spool:
        if platform is None:
            sources = resolve_sources(config, config_path, raw, metered, invoiced)
            result = reconcile_files(config, sources, periods, store, frozenset(customers), progress_bar(), spool)
        else:
            if periods is None:
                raise ConfigError(f"--period: required when reading from {platform} (e.g. --period 2026-10)")
            raw_path = resolve_raw(config, config_path, raw)
            connector = platform_connector(settings, config, platform)
            result = reconcile_platform(
                config, raw_path, connector, periods, store, frozenset(customers), progress_bar(), spool
            )
        if spool is not None and spool.complete:
            spool.deliver()
        else:  # a run stored before: its report is read back from the store
            write_report(result, fmt, out, show_all, limit)
    if route:
        from bot.runtime import build_router

        route_and_report(build_router(settings, config, store), result.head["run_id"], err=True)


def route_and_report(router: Any, run_id: str, err: bool) -> None:
    """Route a run and list each delivery (on stderr after a report, so stdout keeps the report);
    some deliveries failing exits 1 after listing them all."""
    from bot.routing import RoutingIncomplete

    try:
        sent, failure = router.route_run(run_id), None
    except RoutingIncomplete as exc:
        sent, failure = exc.sent, exc
    for item in sent:
        if err:
            click.echo(f"route {item.to}: {item.what}: {item.summary}", err=True)
        else:
            click.echo(f"{item.to}\t{item.what}\t{item.key}\t{item.summary}")
    if failure is not None:
        click.echo(f"recon: {failure}", err=True)
        sys.exit(1)


def billing_platform(config: Config, flag: str | None, metered: Path | None, invoiced: Path | None) -> str | None:
    """The platform whose API gives the metered and invoiced records, or None for files.

    `--billing` wins; else `[sources] metered`/`invoiced` of `stripe:` or `orb:` (both the
    same platform), unless `--metered`/`--invoiced` name files."""
    if flag is not None:
        return None if flag == "files" else flag
    if metered is not None or invoiced is not None:
        return None
    return config.sources.platform


def platform_connector(settings: Settings, config: Config, platform: str) -> InvoiceBilling:
    from bot.runtime import connectors

    factory = connectors(settings, config).get(platform)
    if factory is None:
        raise NotConfigured(f"{platform.upper()}_API_KEY: not set; it is needed to read from {platform}")
    return factory()


def resolve_raw(config: Config, config_path: Path, raw: str | None) -> Path | str:
    """`--raw` (relative to here) or `[sources] raw` (relative to the config): a path, pattern or URL."""
    if raw is not None:
        return resolve(raw, Path("."))
    if config.sources.raw is None:
        raise ConfigError("sources.raw: no raw source (set it in the config or pass --raw)")
    return resolve(config.sources.raw, config_path.parent)


def resolve_sources(
    config: Config, config_path: Path, raw: str | None, metered: Path | None, invoiced: Path | None
) -> SourcePaths:
    """Flags win over `[sources]`; config paths are relative to the config file, URLs are kept."""
    base = config_path.parent
    chosen: dict[str, Path | str] = {}
    for name, flag in (("raw", raw), ("metered", metered), ("invoiced", invoiced)):
        configured = getattr(config.sources, name)
        if flag is not None:
            chosen[name] = resolve(flag, Path(".")) if name == "raw" else flag
        elif configured is not None:
            chosen[name] = resolve(configured, base) if name == "raw" else base / configured
        else:
            raise ConfigError(f"sources.{name}: no {name} source (set it in the config or pass --{name})")
    return SourcePaths(**chosen)


def write_report(result: RunResult, fmt: str, out: Path | None, show_all: bool = False, limit: int = 0) -> None:
    """The report as a table (at most `limit` keys), or as JSON or CSV written line by line
    (never whole in memory)."""
    if fmt == "table":
        report = {**result.head, "lines": result.lines(breaks_only=not show_all)}
        with out.open("w", encoding="utf-8") if out else contextlib.nullcontext(None) as handle:
            render.print_table(report, render.console(handle), show_all, limit)
        return
    with out.open("w", encoding="utf-8") if out else contextlib.nullcontext(sys.stdout) as handle:
        if fmt == "json":
            render.write_json(result.head, result.blocks(), handle)
        else:
            render.write_csv(result.lines(), handle)


def progress_bar() -> Callable[[duckdb.DuckDBPyConnection, threading.Event], None] | None:
    """A progress bar on stderr for the DuckDB scan, when stderr is a terminal."""
    if not sys.stderr.isatty():
        return None

    def watch(con: duckdb.DuckDBPyConnection, done: threading.Event) -> None:
        columns = (
            TextColumn("scanning raw events"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("scan", total=100)
            while not done.wait(0.2):
                bar.update(task, completed=max(con.query_progress(), 0))

    return watch


@main.command()
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Keep the sample book in this folder.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@user_errors
def demo(out_dir: Path | None, fmt: str) -> None:
    """Reconcile a bundled sample book: every class, with no credentials and no network."""
    from bot.demo import run_demo

    run_demo(out_dir, fmt)


@main.command()
@user_errors
def migrate() -> None:
    """Create or upgrade the database schema."""
    settings = Settings.from_env()
    store = Store.open(settings.database_url)
    click.echo(f"schema at version {store.schema_version()}")


@main.command()
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--all", "show_all", is_flag=True, help="Cleared and escalated items too.")
@user_errors
def watchlist(fmt: str, show_all: bool) -> None:
    """Timing items and what cleared them."""
    items = Store.open(Settings.from_env().database_url).watchlist(include_closed=show_all)
    if fmt == "json":
        click.echo(json.dumps(items, indent=2))
        return
    render.print_watchlist(items, render.console())


@main.command()
@click.argument("run_id")
@click.option("--dry-run", is_flag=True, help="Say what would be posted where; send and record nothing.")
@user_errors
def route(run_id: str, dry_run: bool) -> None:
    """Route a stored run: Slack alerts, tickets, webhooks and the period digest (idempotent)."""
    from bot.runtime import build_router

    settings = Settings.from_env()
    config = load_config(settings.config_path)
    store = Store.open(settings.database_url)
    route_and_report(build_router(settings, config, store, dry_run=dry_run), run_id, err=False)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True)
@user_errors
def serve(host: str, port: int) -> None:
    """The web app, for development (production runs the Procfile's gunicorn)."""
    from bot.app import create_app

    create_app().run(host=host, port=port, threaded=False)  # one SQLite connection per process


@main.command()
@click.option("--once", is_flag=True, help="Process what is ready, then exit.")
@click.option("--sweep-every", default=900, show_default=True, help="Seconds between sweeps for lost events.")
@user_errors
def worker(once: bool, sweep_every: int) -> None:
    """Process stored webhook events; several may run at once."""
    from bot.runtime import build_worker, sweep_due
    from bot.schedule import close_due

    settings = Settings.from_env()
    context, job = build_worker(settings, load_config(settings.config_path))
    if once:
        while job.run_once():
            pass
        return
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    sweep, close = sweep_due(context, settings, sweep_every), close_due(context)
    job.run(stop, between=lambda: (sweep(), close()))


@main.command()
@click.option("--period", help="YYYY-MM; default: the latest period closed by [schedule] close_after.")
@user_errors
def close(period: str | None) -> None:
    """Queue a period's close: a worker reconciles every customer of it (run from cron, or by hand)."""
    settings = Settings.from_env()
    config = load_config(settings.config_path)
    zone = config.period.zone
    if period:
        chosen = parse_periods(period, zone)
        if len(chosen) != 1:
            raise PeriodError(f"--period: one month at a time (got {period!r})")
        closing = chosen[0]
    else:
        after = config.schedule.close_after if config.schedule else Schedule().close_after
        closing = last_closed(datetime.now(UTC), zone, after)
    from bot.schedule import enqueue_close

    queued = enqueue_close(Store.open(settings.database_url), closing)
    click.echo(f"period {closing.label}: close {'queued' if queued else 'already queued or done'}")


@main.command()
@click.argument("event_ids", nargs=-1)
@click.option("--since", help="Every event received since this ISO-8601 time.")
@click.option("--sweep", is_flag=True, help="Also list recent invoices and enqueue any no event covers.")
@user_errors
def replay(event_ids: tuple[str, ...], since: str | None, sweep: bool) -> None:
    """Put stored webhook events back in the queue (by id, since a time, or every dead one)."""
    from bot.runtime import build_context, sweep_now

    settings = Settings.from_env()
    store = Store.open(settings.database_url)
    moment = parse_instant(since) if since else None
    if since and moment is None:
        raise InputError(f"--since: not an ISO-8601 time ({since!r})")
    count = store.replay(list(event_ids), moment)
    click.echo(f"{count} events queued again")
    if sweep:
        added = sweep_now(build_context(settings, load_config(settings.config_path)))
        click.echo(f"sweep: {added} invoices with no stored event enqueued")
