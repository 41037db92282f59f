"""The README's Python example runs as written (public entry points stay where it says)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 1, "the README has one Python example; test each new one here"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102 - our own README
    ds, pred = namespace["ds"], namespace["pred"]
    assert pred.shape == (len(ds.test.ids(1)), 32, 32, 3) and np.isfinite(pred).all()
    assert (tmp_path / "my-ridge").is_dir()
