"""The setup script installs only what the tests need."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_apt_installs_skip_recommended_packages():
    """``apt-get install chromium`` pulls ~130 recommended packages; the dashboard test needs
    none of them."""
    lines = [ln for p in sorted((ROOT / "scripts").glob("*.sh")) for ln in p.read_text().splitlines()
             if re.search(r"\bapt-get\b.*\binstall\b", ln) and not ln.lstrip().startswith("#")]
    assert lines, "scripts/test.sh installs its Debian packages with apt-get"
    for ln in lines:
        assert "--no-install-recommends" in ln, ln
