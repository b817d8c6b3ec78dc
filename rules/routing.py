"""Where each finding goes: the config's `[[routes]]` matched against report lines. Pure: no I/O.

A discrepancy key is customer × meter × period (`cus_1|api_calls|2026-10`): one Slack
message per key and channel, one ticket per key and queue, one write-back per key and
kind, whatever the class or amount later runs find for it.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from rules.config import Owner, Route

CSM = "slack:@csm"  # a Slack route to the customer's CSM, whoever the owner map names
ZERO = Decimal(0)


@dataclass(frozen=True)
class Delivery:
    """One finding bound for one destination."""

    key: str
    to: str  # slack:#channel, slack:@user, ticket:jira, ticket:linear, webhook:NAME, watchlist
    line: dict[str, Any]
    owner: Owner | None = None

    @property
    def kind(self) -> str:
        return self.to.split(":", 1)[0]

    @property
    def target(self) -> str:
        """The channel, user, queue or sink name after the kind."""
        return self.to.split(":", 1)[1] if ":" in self.to else self.to


def discrepancy_key(line: Mapping[str, Any]) -> str:
    return f"{line['customer_id']}|{line['meter']}|{line['period']}"


def split_key(key: str) -> tuple[str, str, str]:
    customer, meter, period = key.rsplit("|", 2)
    return customer, meter, period


def key_id(key: str) -> str:
    """A short stable token for a key: Jira labels, Linear markers, webhook delivery ids."""
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def writeback_key(kind: str, key: str) -> str:
    """The platform idempotency key of a write-back (`charge` or `credit`) for a key: the same
    for every click, retry and worker."""
    return f"recon-{kind}-{key_id(key)}"


def destinations(line: Mapping[str, Any], routes: tuple[Route, ...], segment: str | None = None) -> list[str]:
    """Every destination whose class, minimum amount and segment fit the line, in config order."""
    amount = abs(Decimal(line["delta_amount"]))
    return [
        route.to
        for route in routes
        if route.klass == line["class"]
        and amount >= route.min_amount
        and (route.segment is None or route.segment == segment)
    ]


def plan(
    lines: Iterable[Mapping[str, Any]],
    routes: tuple[Route, ...],
    owners: Mapping[str, Owner] | None = None,
    segments: Mapping[str, str] | None = None,
) -> list[Delivery]:
    """The deliveries for a run's lines, in line then config order. `slack:@csm` goes to the
    customer's owner (dropped when the customer has no owner with a Slack id); a ticket carries
    the owner as its assignee."""
    owners = owners if owners is not None else {}
    segments = segments or {}
    deliveries = []
    for line in lines:
        if line["class"] == "match":
            continue
        owner = owners.get(line["customer_id"])
        for to in dict.fromkeys(destinations(line, routes, segments.get(line["customer_id"]))):
            if to == CSM:
                if owner is None or not owner.slack:
                    continue
                to = f"slack:@{owner.slack.lstrip('@')}"
            deliveries.append(Delivery(discrepancy_key(line), to, dict(line), owner))
    return deliveries


def escalated(line: Mapping[str, Any], cycles: int) -> dict[str, Any]:
    """A timing line not cleared after `cycles` later periods, as the under-bill it now is."""
    return {
        **line,
        "class": "under_bill",
        "cause": (
            f"timing item not cleared after {cycles} later period{'s' if cycles != 1 else ''}: "
            f"the late units were never billed ({line['cause']})"
        ),
    }


def actions_for(klass: str) -> tuple[tuple[str, str], ...]:
    """The buttons an alert of this class carries: (action_id, text)."""
    if klass == "under_bill":
        return (("approve", "Approve catch-up charge"), ("absorb", "Absorb"))
    if klass == "over_bill":
        return (("issue_credit", "Issue credit"), ("dismiss", "Dismiss"))
    return ()


WRITES = {"approve": "charge", "issue_credit": "credit"}  # action → write-back kind


def needs_second(action: str, amount: Decimal, above: Decimal | None) -> bool:
    """Maker-checker: a write-back above the threshold needs a second, different person."""
    return action in WRITES and above is not None and abs(amount) > above


def digest(
    lines: Iterable[Mapping[str, Any]], recovered: Iterable[Mapping[str, Any]], decided: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """Counts and amounts by class, what was written back, and what is still open (per currency):
    a break nobody has decided on yet."""
    classes: dict[str, dict[str, Any]] = defaultdict(lambda: {"count": 0, "amounts": defaultdict(Decimal)})
    open_amounts: dict[str, Decimal] = defaultdict(Decimal)
    open_count = 0
    for line in lines:
        if line["class"] == "match":
            continue
        facts = classes[line["class"]]
        facts["count"] += 1
        facts["amounts"][line["currency"]] += Decimal(line["delta_amount"])
        if line["class"] in ("under_bill", "over_bill", "timing", "unmapped") and discrepancy_key(line) not in decided:
            open_count += 1
            open_amounts[line["currency"]] += abs(Decimal(line["delta_amount"]))
    written: dict[str, dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
    for row in recovered:
        written[row["kind"]][row["currency"]] += Decimal(row["amount"])
    return {
        "classes": {k: {"count": v["count"], "amounts": dict(v["amounts"])} for k, v in sorted(classes.items())},
        "written": {k: dict(v) for k, v in sorted(written.items())},
        "open": {"count": open_count, "amounts": dict(open_amounts)},
    }
