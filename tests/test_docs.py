"""The documentation builds without warnings (mkdocs --strict), so broken links fail CI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_docs_build_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "extending" / "index.html").is_file()


def test_generated_reference_pages_are_current():
    """docs/cli.md and docs/decoders.md are what docs/generate.py makes from the code now."""
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import generate
    finally:
        sys.path.pop(0)
    for name, make in generate.PAGES.items():
        current = (ROOT / "docs" / name).read_text(encoding="utf-8")
        assert current == make(), f"docs/{name} is out of date: run `python docs/generate.py`"

