"""What a number of overage units costs under a meter's pricing model.

Four models, as billing platforms have them:
- `flat`: `unit_price` per unit;
- `package`: `package_price` per started (or completed) package of `package_size` units;
- `graduated`: each tier's units at that tier's price, plus each reached tier's flat fee;
- `volume`: every unit at the price of the tier the total falls in, plus its flat fee.
Tiers are `up_to` inclusive, the last one open (`up_to` None).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_UP, Decimal

MODELS = ("flat", "package", "graduated", "volume")
ROUNDINGS = {"up": ROUND_CEILING, "down": ROUND_FLOOR, "half_up": ROUND_HALF_UP}
ZERO = Decimal(0)

# ISO 4217 currencies whose minor unit is not the cent.
_ZERO_DECIMAL = frozenset("bif clp djf gnf isk jpy kmf krw mga pyg rwf ugx vnd vuv xaf xof xpf".split())
_THREE_DECIMAL = frozenset("bhd iqd jod kwd lyd omr tnd".split())


@dataclass(frozen=True)
class Tier:
    up_to: Decimal | None
    unit_price: Decimal
    flat_price: Decimal = ZERO


@dataclass(frozen=True)
class Pricing:
    model: str = "flat"
    unit_price: Decimal = ZERO
    package_size: Decimal = Decimal(1)
    package_price: Decimal = ZERO
    package_rounding: str = "up"
    tiers: tuple[Tier, ...] = ()


def price(pricing: Pricing, units: Decimal) -> Decimal:
    """The unrounded price of `units` overage units (never negative)."""
    if units <= 0:
        return ZERO
    if pricing.model == "flat":
        return units * pricing.unit_price
    if pricing.model == "package":
        packages = (units / pricing.package_size).quantize(Decimal(1), rounding=ROUNDINGS[pricing.package_rounding])
        return packages * pricing.package_price
    if pricing.model == "graduated":
        return _graduated(pricing.tiers, units)
    if pricing.model == "volume":
        return _volume(pricing.tiers, units)
    raise ValueError(f"unknown pricing model {pricing.model!r}")


def _graduated(tiers: tuple[Tier, ...], units: Decimal) -> Decimal:
    total, floor = ZERO, ZERO
    for tier in tiers:
        ceiling = units if tier.up_to is None else min(units, tier.up_to)
        if ceiling <= floor:
            break
        total += (ceiling - floor) * tier.unit_price + tier.flat_price
        floor = ceiling
    return total


def _volume(tiers: tuple[Tier, ...], units: Decimal) -> Decimal:
    for tier in tiers:
        if tier.up_to is None or units <= tier.up_to:
            return units * tier.unit_price + tier.flat_price
    raise ValueError("volume tiers must end with an open tier")


def minor_exponent(currency: str) -> int:
    """Decimal places of a currency's minor unit (2 for usd, 0 for jpy, 3 for kwd)."""
    code = currency.lower()
    if code in _ZERO_DECIMAL:
        return 0
    if code in _THREE_DECIMAL:
        return 3
    return 2


_MINOR_UNITS: dict[str, Decimal] = {}  # currency → its minor unit (0.01 for usd), filled on use
_STEPS: dict[int, Decimal] = {}  # precision → the billable unit step (1, 0.1, ...), filled on use


def minor_unit(currency: str) -> Decimal:
    """The currency's minor unit as a quantum: `0.01` for usd, `1` for jpy."""
    unit = _MINOR_UNITS.get(currency)
    if unit is None:
        unit = _MINOR_UNITS[currency] = Decimal(1).scaleb(-minor_exponent(currency))
    return unit


def round_money(amount: Decimal, currency: str) -> Decimal:
    """`amount` rounded half-up to the currency's minor unit."""
    return amount.quantize(minor_unit(currency), rounding=ROUND_HALF_UP)


def to_minor_units(amount: Decimal, currency: str) -> int:
    """An amount in major units as the platform's integer minor units."""
    return int(round_money(amount, currency).scaleb(minor_exponent(currency)))


def billable_units(raw: Decimal, unit_size: Decimal, rounding: str, precision: int = 0) -> Decimal:
    """Raw units converted to billable units, rounded once as the meter says."""
    step = _STEPS.get(precision)
    if step is None:
        step = _STEPS[precision] = Decimal(1).scaleb(-precision)
    return (raw / unit_size).quantize(step, rounding=ROUNDINGS[rounding])
