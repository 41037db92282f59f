"""The core install: the demo runs with none of the extras importable, and a command that needs an
extra says which one in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from brainrecon.extras import MODULE_EXTRA, missing_extra_message

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

# Makes every optional package unimportable, as in a venv with `pip install brainrecon` only.
_BLOCKER = """
import sys

BLOCKED = {blocked!r}


class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, _NotInstalled())
"""


def _core_env(tmp_path: Path) -> dict[str, str]:
    site = tmp_path / "core-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_BLOCKER.format(blocked=sorted(MODULE_EXTRA)), encoding="utf-8")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT)])
    env.update({"BRAINRECON_CACHE": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf"),
                "TORCH_HOME": str(tmp_path / "torch"), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"})
    env.pop("BRAINRECON_WEIGHTS", None)
    return env


def _brainrecon(env, *args, timeout=600):
    return subprocess.run([sys.executable, "-m", "brainrecon.cli", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_the_demo_runs_without_any_extra(tmp_path):
    env = _core_env(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import diffusers"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'diffusers'" in probe.stderr  # the blocker works
    result = _brainrecon(env, "demo", "--quick", "--out", tmp_path / "demo")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ridge-subj01-pixels" in result.stdout and "brainguard-subj01-pixels" in result.stdout
    assert (tmp_path / "demo" / "grid.png").is_file()
    assert (tmp_path / "demo" / "runs" / "ridge-subj01-pixels" / "per_image.csv").is_file()
    from brainrecon.runs import list_runs

    runs = list_runs(tmp_path / "demo" / "runs")
    assert {r.info["decoder"] for r in runs} == {"ridge", "brainguard"} and len(runs) == 8
    assert all(r.metrics() is not None for r in runs)
    again = _brainrecon(env, "demo", "--quick", "--out", tmp_path / "demo")
    assert again.returncode == 1 and "--overwrite" in again.stderr


def test_a_command_needing_an_extra_names_it(tmp_path):
    env = _core_env(tmp_path)
    result = _brainrecon(env, "fit", "--decoder", "neuropictor", "--data",
                         "synthetic:n_train=40,n_test=4,image_size=32,surface_size=32", "--subjects", "1",
                         "--out", tmp_path / "runs", timeout=300)
    assert result.returncode == 1
    err = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert "pip install 'brainrecon[diffusion]'" in err[-1]


@pytest.mark.parametrize(("module", "extra"), [("h5py", "nsd"), ("flwr.serverapp", "federated"),
                                               ("transformers", "diffusion")])
def test_missing_extra_message(module, extra):
    msg = missing_extra_message(ModuleNotFoundError(f"No module named {module!r}", name=module))
    assert f"pip install 'brainrecon[{extra}]'" in msg
    assert missing_extra_message(ModuleNotFoundError("x", name="numpyy")) is None
    assert missing_extra_message(ValueError("h5py")) is None
