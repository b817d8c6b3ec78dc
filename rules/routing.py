"""Which routes a finding goes to: the config's `[[routes]]` matched against a report line."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from rules.config import Route


def destinations(line: dict[str, Any], routes: tuple[Route, ...], segment: str | None = None) -> list[str]:
    """Every destination whose class, minimum amount and segment fit the line, in config order."""
    amount = abs(Decimal(line["delta_amount"]))
    return [
        route.to
        for route in routes
        if route.klass == line["class"]
        and amount >= route.min_amount
        and (route.segment is None or route.segment == segment)
    ]
