"""The vendored browser libraries are the ones pinned in web/, with their licenses."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
VENDOR = ROOT / "src" / "prismd" / "web" / "vendor"


def test_vendored_libraries_match_the_pins_and_carry_their_licenses() -> None:
    pins = json.loads((ROOT / "web" / "package.json").read_text())["dependencies"]
    lock = json.loads((ROOT / "web" / "package-lock.json").read_text())["packages"]
    vendored = dict(
        line.split(" ", 1) for line in (VENDOR / "VERSIONS.txt").read_text().splitlines()
    )
    assert vendored == pins
    for name, version in pins.items():
        assert lock[f"node_modules/{name}"]["version"] == version
        assert (VENDOR / f"LICENSE.{name}").stat().st_size > 500
    for built in ["marked.esm.js", "purify.es.mjs", "hljs/core.js", "languages.js"]:
        assert (VENDOR / built).stat().st_size > 0


def test_the_app_loads_nothing_from_another_origin() -> None:
    web = ROOT / "src" / "prismd" / "web"
    for path in [web / "index.html", web / "app.css", *(web / "js").glob("*.js")]:
        remote = re.search(
            r"""(src|href)=["']?(https?:)?//|url\(["']?(https?:)?//|(from|import\()\s*["'](https?:)?//""",
            path.read_text(),
        )
        assert remote is None, (path, remote)
