"""Every class and the edges that trip real tools, through the files connector and the core.

The config: api_calls, 1000 raw calls per billable unit rounded up, 50 included,
2.00 USD per unit over; grace 48h.
"""

from __future__ import annotations

from tests.book import OCT, SEP, config_text, event, line, metered, only, run


def test_clean_key_is_a_match(tmp_path):
    report = run(tmp_path, [event("e1", 60_000), event("e2", 40_000)], [metered(100_000)], [line(100, "100.00")])
    verdict = only(report)
    assert (verdict["class"], verdict["break_at"]) == ("match", "none")
    assert verdict["raw_units"] == verdict["metered_units"] == verdict["invoiced_units"] == "100"
    assert (verdict["incurred_overage"], verdict["delta_amount"]) == ("50", "0.00")


def test_events_dropped_by_the_meter_are_an_under_bill_at_metering(tmp_path):
    report = run(tmp_path, [event("e1", 150_000), event("e2", 30_000)], [metered(150_000)], [line(150, "200.00")])
    verdict = only(report)
    assert (verdict["class"], verdict["break_at"]) == ("under_bill", "metering")
    assert (verdict["delta_units"], verdict["delta_amount"]) == ("30", "60.00")


def test_usage_with_no_invoice_line_costs_the_whole_overage(tmp_path):
    report = run(tmp_path, [event("e1", 90_000)], [metered(90_000)], [])
    verdict = only(report)
    assert (verdict["class"], verdict["break_at"]) == ("under_bill", "billing")
    assert verdict["delta_amount"] == "80.00"
    assert "no invoice line" in verdict["cause"]


def test_usage_within_included_units_needs_no_invoice_line(tmp_path):
    report = run(tmp_path, [event("e1", 30_000)], [metered(30_000)], [])
    verdict = only(report)
    assert (verdict["class"], verdict["delta_amount"]) == ("match", "0.00")


def test_meter_counting_duplicates_is_an_over_bill_with_the_duplicate_ids(tmp_path):
    raw = [event("e1", 100_000), event("e2", 20_000), event("e2", 20_000, received_at="2026-10-10T12:05:00Z")]
    report = run(tmp_path, raw, [metered(140_000)], [line(140, "180.00")])
    verdict = only(report)
    assert (verdict["class"], verdict["break_at"]) == ("over_bill", "metering")
    assert verdict["delta_amount"] == "-40.00"
    assert verdict["evidence"]["duplicate_event_ids"] == ["e2"]


def test_duplicates_rightly_ignored_leave_a_match(tmp_path):
    raw = [event("e1", 100_000), event("e1", 100_000, received_at="2026-10-11T00:00:00Z")]
    verdict = only(run(tmp_path, raw, [metered(100_000)], [line(100, "100.00")]))
    assert verdict["class"] == "match"
    assert verdict["evidence"]["duplicate_event_ids"] == ["e1"]
    assert "1 duplicate event ignored" in verdict["cause"]


def test_duplicate_with_a_different_quantity_keeps_the_first_received(tmp_path):
    raw = [
        event("e1", 90_000, received_at="2026-10-10T12:09:00Z"),
        event("e1", 100_000, received_at="2026-10-10T12:01:00Z"),
    ]
    verdict = only(run(tmp_path, raw, [metered(100_000)], [line(100, "100.00")]))
    assert (verdict["class"], verdict["raw_units"]) == ("match", "100")
    assert "differing quantities" in verdict["cause"]


def test_invoice_quantity_above_the_meter_is_an_over_bill_at_billing(tmp_path):
    verdict = only(run(tmp_path, [event("e1", 75_000)], [metered(75_000)], [line(85, "70.00")]))
    assert (verdict["class"], verdict["break_at"]) == ("over_bill", "billing")
    assert verdict["delta_amount"] == "-20.00"


def test_invoice_line_with_no_usage_is_an_over_bill(tmp_path):
    verdict = only(run(tmp_path, [], [], [line(60, "20.00")]))
    assert verdict["class"] == "over_bill"
    assert verdict["delta_amount"] == "-20.00"
    assert verdict["raw_units"] == "0"


def test_wrong_unit_price_on_agreeing_units_is_a_billing_break(tmp_path):
    verdict = only(run(tmp_path, [event("e1", 100_000)], [metered(100_000)], [line(100, "75.00")]))
    assert (verdict["class"], verdict["break_at"], verdict["delta_amount"]) == ("under_bill", "billing", "25.00")


def test_late_events_not_billed_are_timing(tmp_path):
    raw = [
        event("e1", 80_000),
        event("late1", 20_000, timestamp="2026-10-31T20:00:00Z", received_at="2026-11-05T00:00:00Z"),
    ]
    verdict = only(run(tmp_path, raw, [metered(80_000)], [line(80, "60.00")]))
    assert (verdict["class"], verdict["break_at"]) == ("timing", "metering")
    assert (verdict["raw_units"], verdict["late_units"], verdict["delta_amount"]) == ("100", "20", "40.00")
    assert verdict["evidence"]["late_event_ids"] == ["late1"]


def test_event_received_exactly_at_the_cutoff_is_on_time(tmp_path):
    raw = [
        event("e1", 80_000),
        event("edge", 20_000, timestamp="2026-10-31T23:59:59Z", received_at="2026-11-03T00:00:00Z"),
    ]
    verdict = only(run(tmp_path, raw, [metered(100_000)], [line(100, "100.00")]))
    assert (verdict["class"], verdict["late_units"]) == ("match", "0")


def test_event_received_a_second_after_the_cutoff_is_late(tmp_path):
    raw = [
        event("e1", 80_000),
        event("edge", 20_000, timestamp="2026-10-31T23:59:59Z", received_at="2026-11-03T00:00:01Z"),
    ]
    verdict = only(run(tmp_path, raw, [metered(80_000)], [line(80, "60.00")]))
    assert (verdict["class"], verdict["late_units"]) == ("timing", "20")


def test_catch_up_in_the_receiving_period_is_a_match_that_clears_the_timing_item(tmp_path):
    raw = [
        event("s1", 80_000, timestamp="2026-09-10T00:00:00Z"),
        event("late", 20_000, timestamp="2026-09-30T22:00:00Z", received_at="2026-10-05T00:00:00Z"),
        event("o1", 60_000),
    ]
    meters = [metered(80_000, span=SEP), metered(80_000, span=OCT)]
    lines = [line(80, "60.00", span=SEP), line(80, "60.00", span=OCT)]
    report = run(tmp_path, raw, meters, lines, period="2026-09..2026-10")
    september, october = only(report, period="2026-09"), only(report, period="2026-10")
    assert september["class"] == "timing"
    assert (october["class"], october["break_at"], october["catchup_units"]) == ("match", "none", "20")
    assert october["evidence"]["clears"] == [{"customer_id": "cus_a", "meter": "api_calls", "period": "2026-09"}]
    assert october["evidence"]["catchup_event_ids"] == ["late"]


def test_catch_up_of_an_earlier_period_outside_the_run_still_clears(tmp_path):
    raw = [
        event("late", 20_000, timestamp="2026-09-30T22:00:00Z", received_at="2026-10-05T00:00:00Z"),
        event("o1", 60_000),
    ]
    verdict = only(run(tmp_path, raw, [metered(80_000)], [line(80, "60.00")]))
    assert verdict["class"] == "match"
    assert verdict["evidence"]["clears"] == [{"customer_id": "cus_a", "meter": "api_calls", "period": "2026-09"}]


def test_catch_up_not_billed_yet_is_a_match_that_clears_nothing(tmp_path):
    raw = [
        event("late", 20_000, timestamp="2026-09-30T22:00:00Z", received_at="2026-10-05T00:00:00Z"),
        event("o1", 60_000),
    ]
    verdict = only(run(tmp_path, raw, [metered(60_000)], [line(60, "20.00")]))
    assert verdict["class"] == "match"
    assert verdict["evidence"]["clears"] == []


def test_credit_that_explains_the_whole_difference_is_credit(tmp_path):
    lines = [line(130, "160.00"), line(0, "-25.00", kind="credit")]
    verdict = only(run(tmp_path, [event("e1", 130_000)], [metered(130_000)], lines))
    assert (verdict["class"], verdict["break_at"]) == ("credit", "none")
    assert (verdict["delta_amount"], verdict["credit_amount"]) == ("25.00", "-25.00")


def test_credit_that_explains_part_of_the_difference_leaves_an_under_bill(tmp_path):
    lines = [line(110, "120.00"), line(0, "-25.00", kind="credit")]
    verdict = only(run(tmp_path, [event("e1", 130_000)], [metered(130_000)], lines))
    assert verdict["class"] == "under_bill"
    assert verdict["delta_amount"] == "65.00"
    assert "explains part" in verdict["cause"]


def test_unknown_meter_is_unmapped(tmp_path):
    verdict = only(run(tmp_path, [], [], [line(400, "4.00", meter="sms")]), meter="sms")
    assert (verdict["class"], verdict["delta_amount"], verdict["currency"]) == ("unmapped", "-4.00", "usd")
    assert (verdict["expected_amount"], verdict["credit_amount"]) == ("0.00", "0.00")  # to the cent, as elsewhere


def test_invoice_line_without_a_customer_is_unmapped(tmp_path):
    verdict = only(run(tmp_path, [], [], [line(10, "0.00", customer="")]), customer="")
    assert verdict["class"] == "unmapped"
    assert "no customer" in verdict["cause"]


def test_line_in_another_currency_is_unmapped(tmp_path):
    verdict = only(run(tmp_path, [event("e1", 100_000)], [metered(100_000)], [line(100, "100.00", currency="EUR")]))
    assert verdict["class"] == "unmapped"
    assert "eur" in verdict["cause"]


def test_raw_events_of_an_unknown_meter_are_unmapped(tmp_path):
    verdict = only(run(tmp_path, [event("e1", 5, meter="gpu_minutes")], [], []), meter="gpu_minutes")
    assert (verdict["class"], verdict["raw_units"]) == ("unmapped", "5")


def test_tolerance_calls_a_small_difference_a_match(tmp_path):
    config = config_text(tolerance=1)
    verdict = only(run(tmp_path, [event("e1", 100_500)], [metered(100_000)], [line(100, "100.00")], config))
    assert verdict["class"] == "match"


def test_zero_included_units_prices_every_unit(tmp_path):
    config = config_text(included=0)
    verdict = only(run(tmp_path, [event("e1", 10_000)], [metered(10_000)], [line(10, "20.00")], config))
    assert (verdict["class"], verdict["incurred_overage"], verdict["expected_amount"]) == ("match", "10", "20.00")


PLAN = """
[[meters.plan]]
customer = "cus_a"
from = "2026-10-16"
included = 80
unit_price = "1.50"
"""


def test_mid_period_plan_change_priced_right_is_proration(tmp_path):
    raw = [event("a", 60_000, timestamp="2026-10-05T00:00:00Z"), event("b", 90_000, timestamp="2026-10-20T00:00:00Z")]
    lines = [
        line(60, "71.61", kind="proration", span=("2026-10-01T00:00:00Z", "2026-10-16T00:00:00Z")),
        line(90, "73.07", span=("2026-10-16T00:00:00Z", "2026-11-01T00:00:00Z")),
    ]
    verdict = only(run(tmp_path, raw, [metered(150_000)], lines, config_text(extra=PLAN)))
    # included: 50 for 15/31 of the month, 80 for 16/31; 60 units at 2.00 then 90 at 1.50
    assert (verdict["class"], verdict["break_at"]) == ("proration", "none")
    assert (verdict["expected_amount"], verdict["delta_amount"]) == ("144.68", "0.00")


def test_bad_proration_is_an_over_bill(tmp_path):
    raw = [event("a", 60_000, timestamp="2026-10-05T00:00:00Z"), event("b", 90_000, timestamp="2026-10-20T00:00:00Z")]
    lines = [line(150, "200.00")]  # billed the whole month on the old plan
    verdict = only(run(tmp_path, raw, [metered(150_000)], lines, config_text(extra=PLAN)))
    assert (verdict["class"], verdict["break_at"]) == ("over_bill", "billing")
    assert verdict["delta_amount"] == "-55.32"
    assert "prorated" in verdict["cause"]


def test_plan_change_for_another_customer_does_not_prorate(tmp_path):
    raw = [event("a", 100_000, customer="cus_b")]
    verdict = only(
        run(
            tmp_path,
            raw,
            [metered(100_000, customer="cus_b")],
            [line(100, "100.00", customer="cus_b")],
            config_text(extra=PLAN),
        ),
        customer="cus_b",
    )
    assert verdict["class"] == "match"
