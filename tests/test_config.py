from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from rules.config import ConfigError, parse_config

BASE = """
[[meters]]
name = "api_calls"
unit_price = 0.1
"""


def test_defaults_and_exact_decimals():
    config = parse_config(BASE)
    meter = config.meters["api_calls"]
    assert meter.pricing.unit_price == Decimal("0.1")  # a TOML float read as a decimal, not 0.1000000000000000055
    assert (meter.unit_size, meter.rounding, meter.included, meter.currency) == (Decimal(1), "up", Decimal(0), "usd")
    assert config.period.grace == timedelta(hours=48)


def test_plan_dates_are_midnight_in_the_period_zone():
    config = parse_config(
        '[period]\ntimezone = "Europe/Berlin"\n' + BASE + "[[meters.plan]]\nfrom = 2026-10-16\nincluded = 5\n"
    )
    (change,) = config.meters["api_calls"].plan
    assert change.effective == datetime(2026, 10, 15, 22, tzinfo=UTC)
    assert change.pricing.unit_price == Decimal("0.1")  # kept from the meter


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (BASE + "unti_size = 10\n", "meters[0].unti_size: unknown key"),
        (BASE.replace("unit_price = 0.1", 'unit_price = "two"'), "meters[0].unit_price: must be a decimal number"),
        (BASE + 'rounding = "nearest"\n', "meters[0].rounding: must be one of up, down, half_up"),
        (BASE + "unit_size = 0\n", "meters[0].unit_size: must be above 0"),
        (BASE + "included = -1\n", "meters[0].included: must be at least 0"),
        ('[[meters]]\nname = "x"\n', "meters[0].unit_price: required for flat pricing"),
        (BASE + BASE, "meters[1].name: meter 'api_calls' is declared twice"),
        ('[period]\ntimezone = "Mars/Olympus"\n', "period.timezone: unknown time zone"),
        ('[period]\ngrace = "two days"\n', "period.grace: must be a duration"),
        ("[period]\ngrace = 48\n", "period.grace: a number has no unit; write it as a duration such as '48h' or '48s'"),
        ("[schedule]\nclose_after = 3.5\n", "schedule.close_after: a number has no unit"),
        (BASE + 'currency = "dollars"\n', "meters[0].currency: must be a three-letter ISO 4217 code such as 'usd'"),
        (BASE + 'currency = "u$d"\n', "meters[0].currency: must be a three-letter ISO 4217 code"),
        ('[[routes]]\nclass = "refund"\nto = "watchlist"\n', "routes[0].class: must be one of"),
        ('[[routes]]\nclass = "timing"\nto = "email:bob"\n', "routes[0].to: must be slack:#channel"),
        ('[sourcez]\nraw = "x"\n', "sourcez: unknown key"),
        (BASE + 'pricing = "graduated"\ntiers = [{ up_to = 10, unit_price = "1" }]\n', "the last tier must be 'inf'"),
        (
            BASE + 'pricing = "volume"\ntiers = [{ up_to = 10 }, { up_to = 5 }, { up_to = "inf" }]\n',
            "meters[0].tiers[1].up_to: tiers must rise",
        ),
        ("meters = 3", "meters: must be an array of tables"),
        (
            "[stripe]\nrequests_per_second = 0\n",
            "stripe.requests_per_second: must be a whole number of at least 1 (got 0)",
        ),
        ('[orb]\nrequests_per_second = "fast"\n', "orb.requests_per_second: must be a whole number of at least 1"),
        ("[[meters]\n", "not valid TOML"),
    ],
)
def test_a_wrong_key_type_or_value_names_the_key(text, message):
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_durations_and_currencies():
    assert parse_config('[period]\ngrace = "1d12h"\n').period.grace == timedelta(hours=36)
    assert parse_config('[period]\ngrace = "90s"\n').period.grace == timedelta(seconds=90)
    assert parse_config("[period]\ngrace = 0\n").period.grace == timedelta(0)  # no unit needed for none
    assert parse_config(BASE + 'currency = "EUR"\n').meters["api_calls"].currency == "eur"


def test_the_fingerprint_follows_meaning_not_spelling():
    spaced = parse_config(BASE.replace("unit_price = 0.1", "unit_price    =   0.1   # comment"))
    assert spaced.fingerprint == parse_config(BASE).fingerprint
    assert parse_config(BASE.replace("0.1", "0.2")).fingerprint != parse_config(BASE).fingerprint
