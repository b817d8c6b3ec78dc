"""The README lists every environment variable the settings read (sqlite-utils' test_docs idea)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_environment_variable_is_documented():
    read = set(
        re.findall(r'"((?:RECON|STRIPE|ORB|SLACK|JIRA|LINEAR)_[A-Z_]+)"', (ROOT / "bot" / "config.py").read_text())
    )
    readme = (ROOT / "README.md").read_text()
    assert read, "no variables found in bot/config.py"
    assert sorted(v for v in read if f"`{v}`" not in readme) == []
