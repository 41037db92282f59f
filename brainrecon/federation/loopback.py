"""A whole BrainGuard federation on one machine: ``brainrecon fit --decoder brainguard --engine flower``.

:func:`fit_on_flower` starts ``brainrecon federate server`` and one ``brainrecon federate site``
per subject as child processes on loopback, waits for them, and stops every one of them (by
process id) on success, failure or Ctrl-C. Each site writes its own run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from brainrecon.errors import BrainreconError
from brainrecon.federation.supervise import (
    flower_env,
    free_port,
    raise_on_sigterm,
    require_flwr,
    restore_sigterm,
    start_process,
    stop_all,
    stop_flower_processes,
    wait_for_port,
)
from brainrecon.io import jsonable


def _pause(seconds: float) -> None:
    """The wait between two looks at the processes (a test replaces it with a Ctrl-C)."""
    time.sleep(seconds)


def fit_on_flower(params: Mapping[str, Any], *, data: str, subjects: Sequence[int], out: str | os.PathLike,
                  names: Mapping[int, str], overwrite: bool = False, recipe: str | None = None,
                  state_dir: str | os.PathLike | None = None, timeout: float = 3600.0,
                  log=print, site_worker: bool = True) -> list[Path]:
    """Run a BrainGuard federation on loopback: ``federate server`` and one ``federate site``
    per subject as child processes; every one is stopped (by process id) on success,
    failure or Ctrl-C. Their states and logs go to ``state_dir`` (kept, and said where) or
    to a temporary directory that is removed in every case. Returns the run directories the
    sites wrote. ``site_worker=False`` runs the sites without their worker (every round in a
    fresh ClientApp process; the benchmark's "before").
    """
    require_flwr()
    subjects = [int(s) for s in subjects]
    keep_state = state_dir is not None
    root = Path(state_dir) if keep_state else Path(tempfile.mkdtemp(prefix="brainrecon-flower-"))
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    rounds = int(params.get("rounds", 600))
    cli = [sys.executable, "-m", "brainrecon.cli"]
    server_args = cli + ["federate", "server", "--rounds", str(rounds), "--sites", str(len(subjects)),
                         "--host", "127.0.0.1", "--port", str(port), "--server-dir", str(root / "server"),
                         "--params", json.dumps(jsonable(dict(params)))]
    if params.get("resume"):
        # Continue from the server's saved global model and each site's saved state.
        server_args.append("--resume")
    env = flower_env()
    env.setdefault("TQDM_DISABLE", "1")
    processes: list[subprocess.Popen] = []

    previous = raise_on_sigterm()
    try:
        server = start_process(server_args, env=env, log=root / "server.log")
        processes.append(server)
        wait_for_port("127.0.0.1", port, 120, server)
        for s in subjects:
            site_args = cli + ["federate", "site", "--subject", str(s), "--data", str(data),
                               "--server", f"127.0.0.1:{port}", "--state-dir", str(root / f"site-{s}"),
                               "--out", str(out), "--name", names[s], "--no-evaluate"]
            if overwrite:
                site_args.append("--overwrite")
            if recipe:
                site_args += ["--recipe-name", recipe]
            if not site_worker:
                site_args.append("--no-worker")
            processes.append(start_process(site_args, env=env, log=root / f"site-{s}.log"))
        log(f"federation on 127.0.0.1:{port}: server pid {server.pid}, site pids "
            f"{[p.pid for p in processes[1:]]}")
        deadline = time.monotonic() + timeout
        while server.poll() is None:
            for p, s in zip(processes[1:], subjects):
                if p.poll() not in (None, 0):  # 0: the site saw the federation end
                    lines = (root / f"site-{s}.log").read_text(errors="replace").strip().splitlines()
                    raise BrainreconError(f"Site {s} stopped (exit code {p.returncode}): "
                                          f"{lines[-1] if lines else 'no output'}")
            if time.monotonic() > deadline:
                raise BrainreconError(f"The federation did not finish within {timeout:.0f} s.")
            _pause(0.5)
        if server.returncode != 0:
            tail = "\n".join((root / "server.log").read_text(errors="replace").splitlines()[-20:])
            raise BrainreconError(f"The federation failed (server exit code {server.returncode}):\n{tail}")
    finally:
        stop_all(processes)
        # Anything a server or site killed after its grace period could not stop itself.
        for home in [root / "server", *(root / f"site-{s}" for s in subjects)]:
            stop_flower_processes(home / "flwr-home")
        if keep_state:
            log(f"server and site states and logs kept in {root}")
        else:
            # The sites' states hold each subject's private input layer: never left behind,
            # also not after a failure or Ctrl-C (--checkpoint-dir keeps them).
            shutil.rmtree(root, ignore_errors=True)
        restore_sigterm(previous)
    paths = [Path(out) / names[s] for s in subjects]
    missing = [str(p) for p in paths if not p.is_dir()]
    if missing:
        raise BrainreconError(f"The federation finished but site run(s) {missing} are missing.")
    return paths


__all__ = ["fit_on_flower"]
