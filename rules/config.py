"""The reconciliation config: parsed from TOML text and validated, with no I/O.

Every error is a `ConfigError` whose one line names the key at fault, such as
`meters[1].rounding: must be one of up, down, half_up (got 'nearest')`.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from rules.models import CLASSES
from rules.pricing import MODELS, ROUNDINGS, Pricing, Tier

DESTINATION = re.compile(r"^(slack:[#@][\w.\-]+|ticket:(jira|linear)|webhook:[\w.\-]+|watchlist)$")
DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
CURRENCY = re.compile(r"[A-Za-z]{3}")


class ConfigError(ValueError):
    """The config is wrong; the message names the key."""


@dataclass(frozen=True)
class PlanChange:
    """From `effective` on, the meter's included units and pricing are these."""

    effective: datetime
    included: Decimal
    pricing: Pricing
    customer: str | None = None


@dataclass(frozen=True)
class Meter:
    name: str
    unit_size: Decimal = Decimal(1)
    rounding: str = "up"
    precision: int = 0
    included: Decimal = Decimal(0)
    pricing: Pricing = field(default_factory=Pricing)
    currency: str = "usd"
    tolerance: Decimal = Decimal(0)
    stripe_meter: str | None = None
    stripe_price: str | None = None
    orb_metric: str | None = None  # Orb billable metric id
    orb_item: str | None = None  # Orb item id
    orb_price: str | None = None  # Orb price id or external price id
    plan: tuple[PlanChange, ...] = ()


@dataclass(frozen=True)
class Route:
    klass: str
    to: str
    min_amount: Decimal = Decimal(0)
    segment: str | None = None


@dataclass(frozen=True)
class Owner:
    """Who owns a customer (its CSM), as each destination knows them."""

    slack: str | None = None  # a Slack user id (U...) or @handle
    jira: str | None = None  # a Jira accountId
    linear: str | None = None  # a Linear user id


@dataclass(frozen=True)
class RoutingRules:
    """`[routing]`: the digest channel, CSM owners, customer segments, ticket queues, webhook sinks."""

    digest: str | None = None
    owners: dict[str, Owner] = field(default_factory=dict)
    owners_csv: str | None = None
    owner_metadata_key: str | None = None  # else, the billing customer's metadata key naming its CSM
    segments: dict[str, str] = field(default_factory=dict)
    jira_project: str | None = None
    jira_issue_type: str = "Task"
    linear_team: str | None = None
    webhooks: dict[str, str] = field(default_factory=dict)
    second_approver_above: Decimal | None = None


@dataclass(frozen=True)
class PeriodRules:
    timezone: str = "UTC"
    grace: timedelta = timedelta(hours=48)
    escalate_after: int = 1

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


RAW_TABLE_FIELDS = ("event_id", "customer_id", "meter", "timestamp", "quantity", "received_at")


@dataclass(frozen=True)
class RawTable:
    """Where raw events live in a database: the table and, for each canonical field, its column."""

    name: str = "usage_events"  # `table` or `schema.table`
    columns: tuple[tuple[str, str], ...] = tuple((f, f) for f in RAW_TABLE_FIELDS)

    def column(self, field: str) -> str:
        return dict(self.columns)[field]


@dataclass(frozen=True)
class Schedule:
    """`[schedule]`: the period close the worker runs by itself, `close_after` past each
    period's end (after the grace period, so late events have arrived)."""

    close_after: timedelta = timedelta(hours=72)


@dataclass(frozen=True)
class Sources:
    raw: str | None = None
    metered: str | None = None
    invoiced: str | None = None
    raw_table: RawTable = field(default_factory=RawTable)

    @property
    def platform(self) -> str | None:
        """`stripe` or `orb` when `metered`/`invoiced` name that platform's API (`stripe:`,
        `orb:`), None when they are files."""
        named = {v.rstrip(":") for v in (self.metered, self.invoiced) if v in PLATFORM_SOURCES}
        if len(named) > 1:
            raise ConfigError("sources: metered and invoiced must come from the same platform")
        return named.pop() if named else None


PLATFORM_SOURCES = ("stripe:", "orb:")


@dataclass(frozen=True)
class Config:
    sources: Sources
    period: PeriodRules
    meters: dict[str, Meter]
    routes: tuple[Route, ...] = ()
    platforms: dict[str, dict[str, Any]] = field(default_factory=dict)
    evidence_limit: int = 100
    routing: RoutingRules = field(default_factory=RoutingRules)
    schedule: Schedule | None = None  # no [schedule]: no period close by the worker

    @property
    def fingerprint(self) -> str:
        """A hash of the config's meaning (not its spelling): the calculation's version.
        Where findings are sent (`[[routes]]`, `[routing]`, `[approvals]`) and when the close
        runs (`[schedule]`) are not part of it."""
        meaning = {k: v for k, v in asdict(self).items() if k not in ("routing", "schedule")}
        canonical = json.dumps(meaning, sort_keys=True, default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()


_TOP = {"sources", "period", "meters", "routes", "stripe", "orb", "approvals", "evidence", "routing", "schedule"}
_METER_KEYS = {
    "name",
    "unit_size",
    "rounding",
    "precision",
    "included",
    "unit_price",
    "currency",
    "tolerance",
    "stripe_meter",
    "stripe_price",
    "orb_metric",
    "orb_item",
    "orb_price",
    "pricing",
    "package_size",
    "package_price",
    "package_rounding",
    "tiers",
    "plan",
}
_PLATFORM_KEYS = ("stripe_meter", "stripe_price", "orb_metric", "orb_item", "orb_price")
_PRICING_KEYS = {"pricing", "unit_price", "package_size", "package_price", "package_rounding", "tiers"}


def parse_config(text: str) -> Config:
    """Parse and validate config TOML text."""
    try:
        doc = tomllib.loads(text, parse_float=Decimal)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}") from None
    _only(doc, _TOP, "")
    period = _period(doc.get("period", {}))
    meters = _meters(doc.get("meters", []), period)
    routes = tuple(_route(r, f"routes[{i}]") for i, r in enumerate(_list(doc, "routes")))
    evidence = _table(doc.get("evidence", {}), "evidence")
    _only(evidence, {"limit"}, "evidence")
    return Config(
        sources=_sources(doc.get("sources", {})),
        period=period,
        meters=meters,
        routes=routes,
        platforms={k: _platform(doc[k], k) for k in ("stripe", "orb") if k in doc}
        | ({"approvals": _table(doc["approvals"], "approvals")} if "approvals" in doc else {}),
        evidence_limit=_int(evidence.get("limit", 100), "evidence.limit", minimum=0),
        routing=_routing(doc.get("routing", {}), doc.get("approvals", {})),
        schedule=_schedule(doc["schedule"], period) if "schedule" in doc else None,
    )


def _schedule(value: Any, period: PeriodRules) -> Schedule:
    table = _table(value, "schedule")
    _only(table, {"close_after"}, "schedule")
    if "close_after" not in table:
        return Schedule(close_after=max(Schedule().close_after, period.grace))
    close_after = parse_duration(table["close_after"], "schedule.close_after")
    if close_after < period.grace:
        raise ConfigError(
            f"schedule.close_after: must be at least period.grace ({period.grace}), so late events are in (got "
            f"{close_after})"
        )
    return Schedule(close_after=close_after)


def _only(table: dict[str, Any], allowed: set[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            path = f"{where}.{key}" if where else key
            raise ConfigError(f"{path}: unknown key (expected one of {', '.join(sorted(allowed))})")


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a table")
    return value


def _list(doc: dict[str, Any], key: str, where: str = "") -> list[Any]:
    value = doc.get(key, [])
    if not isinstance(value, list):
        path = f"{where}.{key}" if where else key
        raise ConfigError(f"{path}: must be an array of tables ([[{path}]])")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: must be a non-empty string (got {value!r})")
    return value


def _currency(value: Any, where: str) -> str:
    """An ISO 4217 code (`usd`, `EUR`), lower-cased as the platforms report it."""
    text = _str(value, where)
    if not CURRENCY.fullmatch(text):
        raise ConfigError(f"{where}: must be a three-letter ISO 4217 code such as 'usd' (got {text!r})")
    return text.lower()


def _decimal(value: Any, where: str, *, positive: bool = False) -> Decimal:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: must be a number (got {value!r})")
    try:
        number = Decimal(str(value)) if isinstance(value, (int, str, Decimal)) else None
    except InvalidOperation:
        number = None
    if number is None or not number.is_finite():
        raise ConfigError(f"{where}: must be a decimal number (got {value!r})")
    if number < 0 or (positive and number == 0):
        raise ConfigError(f"{where}: must be {'above' if positive else 'at least'} 0 (got {value!r})")
    return number


def _int(value: Any, where: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where}: must be a whole number of at least {minimum} (got {value!r})")
    return value


def _choice(value: Any, choices: tuple[str, ...] | dict[str, Any], where: str) -> str:
    if value not in choices:
        raise ConfigError(f"{where}: must be one of {', '.join(choices)} (got {value!r})")
    return str(value)


def parse_duration(value: Any, where: str) -> timedelta:
    """`48h`, `2d`, `1d12h`, `90m`, `30s`. A bare number is refused: `grace = 48` could mean
    hours as well as seconds, and a wrong guess silently moves events in or out of a period."""
    if isinstance(value, (int, float, Decimal)) and not isinstance(value, bool):
        if value == 0:  # none needs no unit
            return timedelta(0)
        raise ConfigError(f"{where}: a number has no unit; write it as a duration such as '{value}h' or '{value}s'")
    match = DURATION.match(value) if isinstance(value, str) and value else None
    if not match:
        raise ConfigError(f"{where}: must be a duration such as '48h', '2d' or '90m' (got {value!r})")
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)


def _period(table: Any) -> PeriodRules:
    table = _table(table, "period")
    _only(table, {"timezone", "grace", "escalate_after"}, "period")
    zone = _str(table.get("timezone", "UTC"), "period.timezone")
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"period.timezone: unknown time zone {zone!r}") from None
    return PeriodRules(
        timezone=zone,
        grace=parse_duration(table.get("grace", "48h"), "period.grace"),
        escalate_after=_int(table.get("escalate_after", 1), "period.escalate_after", minimum=1),
    )


def _sources(table: Any) -> Sources:
    table = _table(table, "sources")
    _only(table, {"raw", "metered", "invoiced", "raw_table"}, "sources")
    paths = {k: _str(v, f"sources.{k}") for k, v in table.items() if k != "raw_table"}
    return Sources(**paths, raw_table=_raw_table(table.get("raw_table", {})))


def _raw_table(table: Any) -> RawTable:
    """`[sources.raw_table]`: the table's name and a column name for each canonical field."""
    where = "sources.raw_table"
    table = _table(table, where)
    _only(table, {"name", *RAW_TABLE_FIELDS}, where)
    name = _str(table.get("name", RawTable.name), f"{where}.name")
    if any(not part for part in name.split(".")) or name.count(".") > 1:
        raise ConfigError(f"{where}.name: must be 'table' or 'schema.table' (got {name!r})")
    columns = tuple((f, _str(table.get(f, f), f"{where}.{f}")) for f in RAW_TABLE_FIELDS)
    return RawTable(name=name, columns=columns)


def _meters(items: Any, period: PeriodRules) -> dict[str, Meter]:
    if not isinstance(items, list):
        raise ConfigError("meters: must be an array of tables ([[meters]])")
    meters: dict[str, Meter] = {}
    for i, item in enumerate(items):
        meter = _meter(_table(item, f"meters[{i}]"), f"meters[{i}]", period)
        if meter.name in meters:
            raise ConfigError(f"meters[{i}].name: meter {meter.name!r} is declared twice")
        meters[meter.name] = meter
    return meters


def _meter(table: dict[str, Any], where: str, period: PeriodRules) -> Meter:
    _only(table, _METER_KEYS, where)
    name = _str(table.get("name"), f"{where}.name")
    optional = {k: _str(table[k], f"{where}.{k}") for k in _PLATFORM_KEYS if k in table}
    pricing = _pricing(table, where)
    plan = tuple(
        _plan_change(_table(p, f"{where}.plan[{j}]"), f"{where}.plan[{j}]", period, pricing)
        for j, p in enumerate(_list(table, "plan", where))
    )
    return Meter(
        name=name,
        unit_size=_decimal(table.get("unit_size", 1), f"{where}.unit_size", positive=True),
        rounding=_choice(table.get("rounding", "up"), tuple(ROUNDINGS), f"{where}.rounding"),
        precision=_int(table.get("precision", 0), f"{where}.precision", minimum=0),
        included=_decimal(table.get("included", 0), f"{where}.included"),
        pricing=pricing,
        currency=_currency(table.get("currency", "usd"), f"{where}.currency"),
        tolerance=_decimal(table.get("tolerance", 0), f"{where}.tolerance"),
        plan=tuple(sorted(plan, key=lambda p: p.effective)),
        **optional,
    )


def _pricing(table: dict[str, Any], where: str) -> Pricing:
    model = _choice(table.get("pricing", "flat"), MODELS, f"{where}.pricing")
    if model == "flat":
        if "unit_price" not in table:
            raise ConfigError(f"{where}.unit_price: required for flat pricing")
        return Pricing(unit_price=_decimal(table["unit_price"], f"{where}.unit_price"))
    if model == "package":
        for key in ("package_size", "package_price"):
            if key not in table:
                raise ConfigError(f"{where}.{key}: required for package pricing")
        return Pricing(
            model="package",
            package_size=_decimal(table["package_size"], f"{where}.package_size", positive=True),
            package_price=_decimal(table["package_price"], f"{where}.package_price"),
            package_rounding=_choice(table.get("package_rounding", "up"), ("up", "down"), f"{where}.package_rounding"),
        )
    return Pricing(model=model, tiers=_tiers(table.get("tiers"), f"{where}.tiers"))


def _tiers(items: Any, where: str) -> tuple[Tier, ...]:
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{where}: tiered pricing needs a non-empty array of tiers")
    tiers: list[Tier] = []
    for j, item in enumerate(items):
        here = f"{where}[{j}]"
        item = _table(item, here)
        _only(item, {"up_to", "unit_price", "flat_price"}, here)
        bound = item.get("up_to", "inf")
        up_to = None if bound == "inf" else _decimal(bound, f"{here}.up_to", positive=True)
        if tiers and (tiers[-1].up_to is None or (up_to is not None and up_to <= tiers[-1].up_to)):
            raise ConfigError(f"{here}.up_to: tiers must rise, and only the last may be 'inf'")
        tiers.append(
            Tier(
                up_to=up_to,
                unit_price=_decimal(item.get("unit_price", 0), f"{here}.unit_price"),
                flat_price=_decimal(item.get("flat_price", 0), f"{here}.flat_price"),
            )
        )
    if tiers[-1].up_to is not None:
        raise ConfigError(f"{where}[{len(tiers) - 1}].up_to: the last tier must be 'inf'")
    return tuple(tiers)


def _plan_change(table: dict[str, Any], where: str, period: PeriodRules, base: Pricing) -> PlanChange:
    """A dated plan entry; without pricing keys it keeps the meter's pricing."""
    _only(table, {"from", "included", "customer"} | _PRICING_KEYS, where)
    if "included" not in table:
        raise ConfigError(f"{where}.included: required in a plan entry")
    return PlanChange(
        effective=_instant(table.get("from"), f"{where}.from", period.zone),
        included=_decimal(table["included"], f"{where}.included"),
        pricing=_pricing(table, where) if _PRICING_KEYS & table.keys() else base,
        customer=_str(table["customer"], f"{where}.customer") if "customer" in table else None,
    )


def _instant(value: Any, where: str, zone: ZoneInfo) -> datetime:
    """A date (midnight in the period's zone) or a datetime with an offset."""
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise ConfigError(f"{where}: must be a date or a datetime (got {value!r})") from None
    else:
        raise ConfigError(f"{where}: must be a date or a datetime (got {value!r})")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zone)
    return moment.astimezone(ZoneInfo("UTC"))


_IDENTITIES = {"stripe": ("id",), "orb": ("external_customer_id", "id")}


def _platform(table: Any, where: str) -> dict[str, Any]:
    """`[stripe]` / `[orb]`: customer identity and the draft hold switch."""
    table = _table(table, where)
    _only(table, {"customer_id_from", "hold_drafts", "hold_min_amount", "requests_per_second"}, where)
    rules: dict[str, Any] = {}
    if "customer_id_from" in table:
        rule = _str(table["customer_id_from"], f"{where}.customer_id_from")
        allowed = _IDENTITIES[where]
        if rule not in allowed and not (rule.startswith("metadata.") and len(rule) > len("metadata.")):
            choices = ", ".join(f"'{a}'" for a in allowed)
            raise ConfigError(f"{where}.customer_id_from: must be {choices} or 'metadata.<key>' (got {rule!r})")
        rules["customer_id_from"] = rule
    hold = table.get("hold_drafts", False)
    if not isinstance(hold, bool):
        raise ConfigError(f"{where}.hold_drafts: must be true or false (got {hold!r})")
    rules["hold_drafts"] = hold
    rules["hold_min_amount"] = _decimal(table.get("hold_min_amount", 0), f"{where}.hold_min_amount")
    if "requests_per_second" in table:
        rules["requests_per_second"] = _int(table["requests_per_second"], f"{where}.requests_per_second", minimum=1)
    return rules


def _route(table: Any, where: str) -> Route:
    table = _table(table, where)
    _only(table, {"class", "to", "min_amount", "segment"}, where)
    return Route(
        klass=_choice(table.get("class"), CLASSES, f"{where}.class"),
        to=_destination(table.get("to"), f"{where}.to"),
        min_amount=_decimal(table.get("min_amount", 0), f"{where}.min_amount"),
        segment=_str(table["segment"], f"{where}.segment") if "segment" in table else None,
    )


def _destination(value: Any, where: str) -> str:
    if not isinstance(value, str) or not DESTINATION.match(value):
        raise ConfigError(
            f"{where}: must be slack:#channel, slack:@user, ticket:jira, ticket:linear, "
            f"webhook:NAME or watchlist (got {value!r})"
        )
    return value


def _routing(table: Any, approvals: Any) -> RoutingRules:
    table = _table(table, "routing")
    _only(
        table,
        {"digest", "owners", "owners_csv", "owner_metadata_key", "segments", "jira", "linear", "webhooks"},
        "routing",
    )
    approvals = _table(approvals, "approvals")
    _only(approvals, {"second_approver_above"}, "approvals")
    owners = {
        customer: _owner(value, f"routing.owners.{customer}")
        for customer, value in _table(table.get("owners", {}), "routing.owners").items()
    }
    jira = _table(table.get("jira", {}), "routing.jira")
    _only(jira, {"project", "issue_type"}, "routing.jira")
    linear = _table(table.get("linear", {}), "routing.linear")
    _only(linear, {"team_id"}, "routing.linear")
    digest = table.get("digest")
    if digest is not None and not (isinstance(digest, str) and digest.startswith("slack:")):
        raise ConfigError(f"routing.digest: must be slack:#channel or slack:@user (got {digest!r})")
    above = approvals.get("second_approver_above")
    return RoutingRules(
        digest=_destination(digest, "routing.digest") if digest else None,
        owners=owners,
        owners_csv=_str(table["owners_csv"], "routing.owners_csv") if "owners_csv" in table else None,
        owner_metadata_key=(
            _str(table["owner_metadata_key"], "routing.owner_metadata_key") if "owner_metadata_key" in table else None
        ),
        segments={
            k: _str(v, f"routing.segments.{k}")
            for k, v in _table(table.get("segments", {}), "routing.segments").items()
        },
        jira_project=_str(jira["project"], "routing.jira.project") if "project" in jira else None,
        jira_issue_type=_str(jira.get("issue_type", "Task"), "routing.jira.issue_type"),
        linear_team=_str(linear["team_id"], "routing.linear.team_id") if "team_id" in linear else None,
        webhooks={
            k: _str(v, f"routing.webhooks.{k}")
            for k, v in _table(table.get("webhooks", {}), "routing.webhooks").items()
        },
        second_approver_above=_decimal(above, "approvals.second_approver_above") if above is not None else None,
    )


def _owner(value: Any, where: str) -> Owner:
    """A Slack user as a string, or a table `{slack, jira, linear}`."""
    if isinstance(value, str):
        return Owner(slack=_str(value, where))
    table = _table(value, where)
    _only(table, {"slack", "jira", "linear"}, where)
    return Owner(**{k: _str(v, f"{where}.{k}") for k, v in table.items()})
