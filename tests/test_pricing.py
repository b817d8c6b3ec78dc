from decimal import Decimal

import pytest

from rules.pricing import Pricing, Tier, billable_units, price, round_money, to_minor_units

D = Decimal
TIERS = (Tier(D(1000), D("0.10")), Tier(D(5000), D("0.08"), D("5")), Tier(None, D("0.05")))


@pytest.mark.parametrize(
    ("raw", "rounding", "units"),
    [
        ("50000", "up", "50"),  # exactly on the boundary: no extra unit
        ("50001", "up", "51"),
        ("50999", "down", "50"),
        ("50500", "half_up", "51"),
        ("50499.999", "half_up", "50"),
        ("0", "up", "0"),
    ],
)
def test_billable_units_round_once_on_the_total(raw, rounding, units):
    assert billable_units(D(raw), D(1000), rounding) == D(units)


def test_billable_units_keep_the_configured_decimals():
    assert billable_units(D("12.345"), D(1), "half_up", precision=2) == D("12.35")


@pytest.mark.parametrize(
    ("pricing", "units", "expected"),
    [
        (Pricing(unit_price=D("2.00")), "70", "140.00"),
        (Pricing(unit_price=D("2.00")), "-5", "0"),
        (Pricing("package", package_size=D(10), package_price=D("15")), "21", "45"),
        (Pricing("package", package_size=D(10), package_price=D("15"), package_rounding="down"), "29", "30"),
        (Pricing("graduated", tiers=TIERS), "1000", "100.00"),
        # 1000 at 0.10, 4000 at 0.08 + 5 flat, 500 at 0.05
        (Pricing("graduated", tiers=TIERS), "5500", "450.00"),
        (Pricing("volume", tiers=TIERS), "1000", "100.00"),
        (Pricing("volume", tiers=TIERS), "1001", "85.08"),
        (Pricing("volume", tiers=TIERS), "5500", "275.00"),
    ],
)
def test_price(pricing, units, expected):
    assert price(pricing, D(units)) == D(expected)


@pytest.mark.parametrize(
    ("amount", "currency", "rounded", "minor"),
    [("12.345", "usd", "12.35", 1235), ("1234.5", "jpy", "1235", 1235), ("1.2345", "kwd", "1.235", 1235)],
)
def test_money_rounds_to_the_currency_minor_unit(amount, currency, rounded, minor):
    assert round_money(D(amount), currency) == D(rounded)
    assert to_minor_units(D(amount), currency) == minor
