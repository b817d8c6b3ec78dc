"""`[orb]` and the Orb meter mappings in recon.toml."""

from __future__ import annotations

import pytest

from rules.config import ConfigError, parse_config

METER = '[[meters]]\nname = "api"\nunit_price = "1"\n'


def test_orb_mappings_are_read():
    config = parse_config(METER + 'orb_metric = "m_1"\norb_item = "i_1"\norb_price = "p_1"\n')
    meter = config.meters["api"]
    assert (meter.orb_metric, meter.orb_item, meter.orb_price) == ("m_1", "i_1", "p_1")


@pytest.mark.parametrize("rule", ["external_customer_id", "id", "metadata.account_id"])
def test_orb_customer_rules_are_accepted(rule):
    assert parse_config(METER + f'[orb]\ncustomer_id_from = "{rule}"\n').platforms["orb"]["customer_id_from"] == rule


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('[orb]\ncustomer_id_from = "email"\n', r"^orb\.customer_id_from: must be"),
        ('[orb]\ncustomer_id_from = "metadata."\n', r"^orb\.customer_id_from: must be"),
        ('[stripe]\ncustomer_id_from = "external_customer_id"\n', r"^stripe\.customer_id_from: must be"),
        ("[orb]\nhold_drafts = 1\n", r"^orb\.hold_drafts: must be true or false"),
        ('[orb]\nwebhook = "x"\n', r"^orb\.webhook: unknown key"),
        (METER.replace("[[meters]]", "[[meters]]\norb_item = 3"), r"orb_item: must be a non-empty string"),
    ],
)
def test_bad_orb_settings_name_the_key(table, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(METER + table if not table.startswith("[[meters]]") else table)
