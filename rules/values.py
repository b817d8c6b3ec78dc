"""Parsing the values of canonical records: decimal strings and instants."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
UNIX_SECONDS = re.compile(r"^-?\d+(\.\d{1,6})?$")


def parse_decimal(text: str) -> Decimal | None:
    """A finite decimal from its string form, or None."""
    try:
        number = Decimal(text.strip())
    except (InvalidOperation, ValueError):
        return None
    return number if number.is_finite() else None


def parse_instant(text: str) -> datetime | None:
    """ISO-8601 (an instant without an offset is UTC) or Unix seconds, as UTC; or None."""
    text = text.strip()
    if UNIX_SECONDS.match(text):
        return EPOCH + timedelta(microseconds=int(Decimal(text) * 1_000_000))
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)
