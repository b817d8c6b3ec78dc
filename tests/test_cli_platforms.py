"""`recon reconcile` reading metered units and invoice lines from Orb (or Stripe) for a period."""

from __future__ import annotations

import json

from click.testing import CliRunner

from bot.cli import main
from tests.book import RAW, write_csv
from tests.orb_fake import BASE, CUSTOMER, DEC, NOV, OCT, invoice, line_item, page, serve_invoice, serve_usage

CONFIG = """
[sources]
raw = "raw.csv"
{billing}

[[meters]]
name = "api_calls"
unit_price = "2.00"
included = 50
orb_metric = "metric_api"
"""


def setup(tmp_path, billing: str = "") -> str:
    (tmp_path / "recon.toml").write_text(CONFIG.format(billing=billing))
    rows = [[f"e{i}", CUSTOMER, "api_calls", f"2026-10-{i + 1:02d}T10:00:00Z", "10", ""] for i in range(15)]
    write_csv(tmp_path / "raw.csv", RAW, rows)
    return str(tmp_path / "recon.toml")


def recon(monkeypatch, *args: str):
    monkeypatch.setenv("ORB_API_KEY", "orb_test")
    monkeypatch.setenv("ORB_API_BASE", BASE)
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def serve_october(orb_api) -> None:
    october = invoice([line_item("li_oct", quantity=120, subtotal="140.00")], id="in_oct")
    november = invoice([line_item("li_nov", start=NOV, end=DEC)], id="in_nov")
    orb_api.get(f"{BASE}/invoices", json=page([october, november]))
    serve_invoice(orb_api, october)
    serve_invoice(orb_api, november)
    serve_usage(orb_api, OCT, NOV, {"metric_api": [120]})
    serve_usage(orb_api, NOV, DEC, {"metric_api": [5]})


def test_billing_orb_reads_the_period_from_orb(tmp_path, orb_api, monkeypatch):
    config = setup(tmp_path)
    serve_october(orb_api)

    result = recon(
        monkeypatch, "reconcile", "--config", config, "--billing", "orb", "--period", "2026-10", "--format", "json"
    )

    assert result.exit_code == 0, result.output
    (verdict,) = json.loads(result.stdout)["lines"]
    assert (verdict["class"], verdict["delta_amount"], verdict["evidence"]["invoice_line_ids"]) == (
        "under_bill",
        "60.00",
        ["li_oct"],
    )


def test_orb_sources_in_the_config_do_the_same(tmp_path, orb_api, monkeypatch):
    config = setup(tmp_path, 'metered = "orb:"\ninvoiced = "orb:"')
    serve_october(orb_api)

    result = recon(monkeypatch, "reconcile", "--config", config, "--period", "2026-10", "--format", "json")

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["lines"][0]["metered_units"] == "120"


def test_a_platform_needs_a_period_and_a_key(tmp_path, monkeypatch):
    config = setup(tmp_path)
    no_period = recon(monkeypatch, "reconcile", "--config", config, "--billing", "orb")
    assert no_period.exit_code == 2 and "--period: required" in no_period.stderr
    monkeypatch.delenv("ORB_API_KEY")
    runner = CliRunner().invoke(main, ["reconcile", "--config", config, "--billing", "orb", "--period", "2026-10"])
    assert runner.exit_code == 2 and "ORB_API_KEY" in runner.stderr


def test_stripe_reads_a_period_through_the_same_interface(stripe_api):
    from connectors.base import period_records
    from tests import stripe_fake as sf

    listing = sf.page("/v1/invoices", [sf.invoice()])
    stripe_api.get(
        f"{sf.BASE}/v1/invoices",
        json=listing,
        match=[sf.query(limit=100, **{"created[gte]": sf.OCT - 86400, "created[lt]": sf.NOV + 2 * 86400})],
    )
    sf.serve_invoice(stripe_api, [sf.line("il_oct"), sf.line("il_nov", start=sf.NOV, end=sf.DEC)])
    sf.serve_summaries(stripe_api, "mtr_api", sf.OCT, sf.NOV, [120])
    sf.serve_summaries(stripe_api, "mtr_api", sf.NOV, sf.DEC, [5])
    sf.serve_summaries(stripe_api, "mtr_storage", sf.OCT, sf.DEC, [])

    metered, lines = period_records(sf.billing(sf.METERED), sf.at(sf.OCT), sf.at(sf.NOV))

    assert [ln.line_id for ln in lines] == ["il_oct"]
    assert [(m.meter, m.quantity) for m in metered] == [("api_calls", 120)]
