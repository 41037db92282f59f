"""Decoders from another distribution, found through the brainrecon.decoders entry points."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from brainrecon.cli import app
from brainrecon.decoders import available, get_decoder, get_decoder_class, load_decoder
from brainrecon.errors import BrainreconError
from brainrecon.runs import Run
from brainrecon.testing import DecoderConformance

DOCS = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def _example_code() -> str:
    """The decoder shown in docs/extending.md, so the documentation is what the test runs."""
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(encoding="utf-8"), flags=re.S)
    return next(b for b in blocks if "class KernelAverageDecoder" in b)


def _install(site: Path, dist: str, package: str, code: str, entry_points: str) -> None:
    """A distribution as pip would leave it: the package and a .dist-info with entry points."""
    (site / package).mkdir(parents=True)
    (site / package / "__init__.py").write_text(code, encoding="utf-8")
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n", encoding="utf-8")
    (info / "entry_points.txt").write_text(entry_points, encoding="utf-8")


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    site = tmp_path_factory.mktemp("plugins") / "site"
    _install(site, "brainrecon_meanimage", "brainrecon_meanimage", _example_code(),
             "[brainrecon.decoders]\nkernel-average = brainrecon_meanimage:KernelAverageDecoder\n")
    _install(site, "brainrecon_broken", "brainrecon_broken", "import a_module_that_does_not_exist\n",
             "[brainrecon.decoders]\nbroken = brainrecon_broken:Nothing\nridge = brainrecon_broken:Nothing\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(site))
        yield site
    for mod in [m for m in sys.modules if m.startswith(("brainrecon_meanimage", "brainrecon_broken"))]:
        del sys.modules[mod]
    import brainrecon.decoders as D

    for name in ("kernel-average", "broken"):
        D._REGISTRY.pop(name, None)
        D._PLUGIN_DIST.pop(name, None)
    D.plugin_problems.clear()


def test_a_plugin_is_listed_fitted_saved_loaded_and_ranked(plugin_site, tmp_path, small_data):
    assert "kernel-average" in available() and "ridge" in available()
    cls = get_decoder_class("kernel-average")
    assert cls.__module__ == "brainrecon_meanimage"

    runner = CliRunner()
    listed = runner.invoke(app, ["decoders"])
    assert listed.exit_code == 0 and "kernel-average" in listed.output
    assert "broken plugin" in listed.output and "brainrecon_broken" in listed.output

    out = tmp_path / "runs"
    result = runner.invoke(app, ["fit", "--decoder", "kernel-average", "--data",
                                 "synthetic:n_train=120,n_test=12,image_size=32,surface_size=32",
                                 "--subjects", "1", "--out", str(out), "--temperature", "0.1"])
    assert result.exit_code == 0, result.output
    assert Run.open(out / "kernel-average-subj01").info["params"]["temperature"] == 0.1
    helped = runner.invoke(app, ["fit", "--help"], env={"COLUMNS": "200"})
    assert "kernel-average options" in helped.output and "--temperature" in helped.output
    wrong = runner.invoke(app, ["fit", "--decoder", "ridge", "--temperature", "0.1", "--data",
                                "synthetic:n_train=120,n_test=12,image_size=32,surface_size=32"])
    assert wrong.exit_code == 1 and "--temperature is an option of kernel-average, not of 'ridge'" in wrong.output
    board = runner.invoke(app, ["leaderboard", "--runs", str(out)])
    assert board.exit_code == 0 and "kernel-average" in board.output

    dec = get_decoder("kernel-average", subject=1, max_train=50).fit(small_data.train)
    dec.save(tmp_path / "saved")
    again = load_decoder(tmp_path / "saved")
    assert type(again).__name__ == "KernelAverageDecoder"
    a, b = dec.predict(small_data.test), again.predict(small_data.test)
    np.testing.assert_array_equal(a[1], b[1])


def test_a_broken_plugin_is_named_and_cannot_shadow_a_builtin(plugin_site):
    with pytest.raises(BrainreconError, match=r"plugin decoder 'broken'.*brainrecon_broken.*ModuleNotFoundError"):
        get_decoder_class("broken")
    assert get_decoder_class("ridge").__module__ == "brainrecon.decoders.ridge"
    import brainrecon.decoders as D

    available()
    assert "is a built-in" in D.plugin_problems["ridge"]


class TestDocumentedPluginConformance(DecoderConformance):
    """The conformance suite a plugin inherits, run on the decoder of docs/extending.md."""

    @pytest.fixture(autouse=True)
    def _installed(self, plugin_site):
        yield

    def make_decoder(self, **overrides):
        from brainrecon_meanimage import KernelAverageDecoder

        return KernelAverageDecoder(**{"subject": 1, **overrides})

    def make_data(self):
        from brainrecon.data.synthetic import make_synthetic

        return make_synthetic(seed=0, subjects=(1,), n_train=80, n_test=8, image_size=32, surface_size=32)
