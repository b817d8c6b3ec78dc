"""Reports for people and scripts: a rich table, JSON, or CSV."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import orjson
from rich.console import Console
from rich.table import Table

from rules.report import CSV_COLUMNS, csv_row, line_text

CLASS_STYLE = {
    "match": "green",
    "under_bill": "bold red",
    "over_bill": "bold magenta",
    "timing": "yellow",
    "credit": "cyan",
    "proration": "blue",
    "unmapped": "bold white",
}


def console(file: Any = None) -> Console:
    """A console that is wide enough for the tables when the output is not a terminal."""
    target = Console(file=file)
    return target if target.is_terminal else Console(file=file, width=180)


def json_text(value: Any) -> str:
    """`value` as JSON indented by two spaces, non-ASCII kept: the bytes of
    `json.dumps(value, indent=2, ensure_ascii=False)`, made by orjson."""
    try:
        return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()
    except orjson.JSONEncodeError:  # e.g. a lone surrogate, which only `json` writes
        return json.dumps(value, indent=2, ensure_ascii=False)


def as_json(report: dict[str, Any]) -> str:
    buffer = io.StringIO()
    head = {k: v for k, v in report.items() if k != "lines"}
    write_json(head, map(line_text, report["lines"]), buffer)
    return buffer.getvalue()


_NO_LINES = '"lines": []\n}'


def write_json(head: dict[str, Any], lines: Iterable[str], out: TextIO) -> None:
    """The report: `head` indented by two spaces, then `"lines"` with each line's compact JSON
    text (`rules.report.line_text`, as the store keeps it) on a text line of its own, so a
    report of 500,000 keys can be searched with grep and is written as it is read, never whole
    in memory."""
    out.writelines(json_pieces(head, lines))


def json_pieces(head: dict[str, Any], lines: Iterable[str]) -> Iterator[str]:
    """The text of `write_json`, piece by piece (an HTTP response streams them). An item of
    `lines` may be a block of several line texts joined by newlines (`Store.line_blocks`): it
    is written in one step (a line's text never holds a newline of its own)."""
    pieces = JsonPieces(head)
    yield pieces.opening
    yield from map(pieces.block, lines)
    yield pieces.closing()


class JsonPieces:
    """The pieces of `write_json`'s text for one report: its opening (the head), then each block
    of line texts in order, then its closing."""

    def __init__(self, head: dict[str, Any]) -> None:
        text = json_text({**head, "lines": []})
        assert text.endswith(_NO_LINES)
        self.opening = text[: -len("[]\n}")]
        self._separator = "[\n    "

    def block(self, lines: str) -> str:
        """A block of line texts joined by newlines, as it stands in the report."""
        return self.separator() + lines.replace("\n", ",\n    ")

    def separator(self) -> str:
        """What stands before the next block: the lines' opening bracket, then a comma."""
        separator, self._separator = self._separator, ",\n    "
        return separator

    def closing(self) -> str:
        return "[]\n}\n" if self._separator.startswith("[") else "\n  ]\n}\n"


class JsonSpool:
    """The JSON report written while the run's lines are stored, from the same texts and in the
    same pass (`Store.save_run`'s `seen`), instead of read back from the store afterwards.

    It is written to a temporary file (beside `out`, or in the temporary folder for stdout)
    and delivered only once the run is committed: moved into place, or copied to stdout. A run
    that fails to store leaves no report behind, and a partial report is never printed.
    Used as a context manager, which removes the temporary file if it was not delivered."""

    def __init__(self, out: Path | None) -> None:
        self.out = out
        handle, name = tempfile.mkstemp(prefix=".recon-report-", suffix=".json", dir=out.parent if out else None)
        self.path = Path(name)
        self._file: BinaryIO = os.fdopen(handle, "wb")
        self._pieces: JsonPieces | None = None
        self.complete = False

    def begin(self, head: dict[str, Any]) -> None:
        self._pieces = JsonPieces(head)
        self._file.write(self._pieces.opening.encode())

    def page(self, lines: bytes) -> None:
        """One page of line texts joined by newlines, in UTF-8 (`Store.save_run`'s `seen`)."""
        assert self._pieces is not None, "begin() first"
        self._file.write(self._pieces.separator().encode() + lines.replace(b"\n", b",\n    "))

    def finish(self) -> None:
        assert self._pieces is not None, "begin() first"
        self._file.write(self._pieces.closing().encode())
        self._file.close()
        self.complete = True

    def deliver(self) -> None:
        """The finished report to its place: `out`, or stdout."""
        assert self.complete, "finish() first"
        if self.out is not None:
            os.replace(self.path, self.out)
            return
        sys.stdout.flush()
        with self.path.open("rb") as spooled:
            shutil.copyfileobj(spooled, sys.stdout.buffer, 1 << 20)
        sys.stdout.buffer.flush()

    def __enter__(self) -> JsonSpool:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


def as_csv(report: dict[str, Any]) -> str:
    buffer = io.StringIO()
    write_csv(report["lines"], buffer)
    return buffer.getvalue()


def write_csv(lines: Iterable[dict[str, Any]], out: TextIO) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    writer.writerows(csv_row(line) for line in lines)


def print_table(report: dict[str, Any], console: Console, show_matches: bool = False, limit: int = 0) -> None:
    """The summary by class, then the keys that are not matches (every key with `show_matches`)
    in report order, the first `limit` of them (0: all) and how many more there are."""
    print_summary(report, console)
    wanted = (ln for ln in report["lines"] if show_matches or ln["class"] != "match")
    lines = list(islice(wanted, limit or None))
    summary = report["summary"]
    hidden = (summary["keys"] if show_matches else summary["keys"] - summary["matched"]) - len(lines)
    if not lines:
        return
    table = Table(title="Discrepancies" if not show_matches else "Keys", show_lines=False)
    for column, justify in (
        ("customer", "left"),
        ("meter", "left"),
        ("period", "left"),
        ("raw", "right"),
        ("metered", "right"),
        ("invoiced", "right"),
        ("Δ amount", "right"),
        ("class", "left"),
        ("break at", "left"),
    ):
        table.add_column(column, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    table.add_column("cause", overflow="fold", min_width=30)
    for ln in lines:
        table.add_row(
            ln["customer_id"],
            ln["meter"],
            ln["period"],
            ln["raw_units"],
            ln["metered_units"],
            ln["invoiced_units"],
            f"{ln['delta_amount']} {ln['currency'].upper()}",
            f"[{CLASS_STYLE[ln['class']]}]{ln['class']}[/]",
            ln["break_at"],
            ln["cause"],
        )
    console.print(table)
    if hidden > 0:
        console.print(f"[dim]{hidden:,} more not shown (--limit 0 lists them all; --format json or csv writes them)[/]")


def print_summary(report: dict[str, Any], console: Console) -> None:
    summary = report["summary"]
    periods = ", ".join(report["period"].get("periods", [])) or report["period"].get("label", "")
    console.print(f"[bold]Run {report['run_id']}[/] · {periods} · {summary['keys']} keys, {summary['matched']} matched")
    table = Table(show_header=True, box=None, padding=(0, 2))
    table.add_column("class")
    table.add_column("keys", justify="right")
    table.add_column("delta amount", justify="right")
    for klass, facts in summary["classes"].items():
        # a class with no key has no amount, in no currency
        amount = ", ".join(f"{v} {k.upper()}" for k, v in facts["amounts"].items()) or "—"
        table.add_row(f"[{CLASS_STYLE[klass]}]{klass}[/]", str(facts["count"]), amount)
    console.print(table)
    scope = summary.get("out_of_scope", {})
    if any(scope.values()):
        console.print(
            f"[dim]Outside the run's periods: {scope.get('metered', 0)} metered rows, "
            f"{scope.get('invoice_lines', 0)} invoice lines[/]"
        )


def print_watchlist(items: list[dict[str, Any]], console: Console) -> None:
    if not items:
        console.print("No timing items.")
        return
    table = Table(title="Timing watch-list")
    for column in ("customer", "meter", "period", "late units", "status", "cycles", "cleared by / escalated by"):
        table.add_column(column)
    for item in items:
        cleared = item["cleared_by"]
        how = ""
        if cleared:
            invoice = f", invoice {cleared['invoice_id']}" if cleared.get("invoice_id") else ""
            how = f"run {cleared['run_id']} ({cleared['period']}{invoice})"
        elif item.get("escalated_by"):
            how = f"escalated to under_bill by run {item['escalated_by']}"
        row = (item["customer_id"], item["meter"], item["period"], item["late_units"], item["status"])
        table.add_row(*row, str(item.get("cycles", 0)), how)
    console.print(table)
