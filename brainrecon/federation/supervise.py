"""The processes of a federation: starting and stopping them, finding the ones a crash left.

Flower runs with its deployment runtime: a SuperLink, one SuperNode per site, and the
processes they start (the SuperLink's SuperExec and the ServerApp it launches detach into
sessions of their own). Everything here is about those processes, not about BrainGuard:
Flower's environment (telemetry off unless the user chose otherwise), starting a process with
its output in a log, stopping it and its group by id, stopping the leftovers of a crashed
server or site by their ``FLWR_HOME``, and one directory lock per server or site.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from brainrecon.errors import BrainreconError

INSTALL_HINT = "pip install 'brainrecon[federated]'"
#: Environment variable naming the file a site's SuperNode writes once the SuperLink admitted it.
ADMITTED_ENV = "BRAINRECON_SITE_ADMITTED"


def require_flwr():
    """Flower, or an error with the line that installs it."""
    try:
        import flwr
    except ImportError:
        raise BrainreconError(
            f"Federating across processes needs Flower (flwr >= 1.42): {INSTALL_HINT}"
        ) from None
    return flwr


def flower_env(base: Mapping[str, str] | None = None, flwr_home: str | os.PathLike | None = None) -> dict[str, str]:
    """The environment for Flower processes: telemetry off unless the user chose otherwise, and
    this Python's scripts first on ``PATH`` (Flower starts ``flower-superexec``,
    ``flwr-serverapp`` and ``flwr-clientapp`` by name, also when the venv is not activated)."""
    env = dict(os.environ if base is None else base)
    scripts = str(Path(sys.executable).parent)
    if scripts not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = os.pathsep.join(p for p in (scripts, env.get("PATH", "")) if p)
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Wait until something listens on ``host:port``; fail if ``process`` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise BrainreconError(f"{process.args[0]} exited with code {process.returncode} before listening on {port}.")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            try:
                s.connect((host, port))
                return
            except OSError:
                pass
        time.sleep(0.2)
    raise BrainreconError(f"Nothing listens on {host}:{port} after {timeout:.0f} s.")


def flower_processes(flwr_home: str | os.PathLike) -> list[int]:
    """Live processes (not zombies, not this one) started with ``FLWR_HOME=flwr_home``.

    Every process of one ``federate server`` or ``federate site`` inherits that variable,
    including the ones Flower detaches into sessions of their own (the SuperLink's SuperExec
    and the ServerApps it launches), which a stop of our process group cannot reach and which
    outlive a crash of their parent wherever orphans are not reaped (their parent check then
    sees a zombie as alive). Linux only (``/proc``); elsewhere an empty list.
    """
    wanted = f"FLWR_HOME={Path(flwr_home).resolve()}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        if pid == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if wanted in environ.split(b"\0") and stat[stat.rindex(")") + 2:].split()[0] != "Z":
            found.append(pid)
    return sorted(found)


def stop_flower_processes(flwr_home: str | os.PathLike, *, grace: float = 5.0, settle: float = 0.0) -> list[int]:
    """Stop every process :func:`flower_processes` finds: SIGTERM, then SIGKILL after ``grace`` s.

    ``settle``: first wait up to that many seconds for them to end by themselves. Once their
    parent (a SuperNode) is gone, Flower's SuperExec and ClientApps notice within 0.2 s and exit
    gracefully; a SIGTERM landing while one of them starts doing so makes Python print "Signal
    15 ignored due to race condition" with a traceback (Flower's handler resets the default).

    Returns the pids that were found.
    """
    pids = flower_processes(flwr_home)
    deadline = time.monotonic() + settle
    while pids and time.monotonic() < deadline:
        time.sleep(0.1)
        pids = flower_processes(flwr_home)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + wait
        while flower_processes(flwr_home) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not flower_processes(flwr_home):
            break
    return pids


class DirectoryLock:
    """An exclusive ``flock`` on ``directory/.lock``: one server (or site) per directory.

    The kernel drops the lock when its holder dies, so a crashed server never blocks its restart.
    """

    def __init__(self, directory: Path, what: str):
        import fcntl

        self.path = directory / ".lock"
        self.file = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise BrainreconError(
                f"Another {what} is running in {directory} (pid {holder}); stop it first, or use "
                f"another directory."
            ) from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()

    def release(self) -> None:
        self.file.close()


def start_process(args: Sequence[str], *, env: Mapping[str, str], log: Path,
                  new_group: bool = True, cwd: str | os.PathLike | None = None,
                  append: bool = True) -> subprocess.Popen:
    """Start ``args`` with its output in ``log``.

    ``new_group=True`` (the processes :func:`~brainrecon.federation.loopback.fit_on_flower`
    starts) puts it in a process group of its own, whose id is its pid: :func:`stop_process`
    then stops it and everything it started. ``new_group=False`` (a SuperLink or SuperNode
    under ``federate server`` / ``federate site``) keeps it in the caller's group, so a Ctrl-C
    at the terminal or a stop of the caller's group reaches it too.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab" if append else "wb") as out:
        process = subprocess.Popen(list(args), env=dict(env), stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=new_group, cwd=cwd)
    process.own_group = new_group
    return process


def stop_process(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop a process started by :func:`start_process`, by its id (and its group's, if its own)."""
    if process.poll() is None:
        # SIGTERM first: brainrecon's own commands turn it into a clean shutdown that stops
        # the Flower processes they started.
        try:
            process.terminate()
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    if getattr(process, "own_group", False):
        # Whatever is left in the group we created (ClientApp processes, ...): the group id is
        # the leader's pid. The SuperLink's SuperExec has a session of its own; `serve` stops
        # it by its FLWR_HOME (stop_flower_processes).
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if process.poll() is None:
        process.wait(timeout=timeout)


def stop_all(processes: Sequence[subprocess.Popen]) -> None:
    """Stop every process, last started first; a second Ctrl-C does not cut this short."""
    for process in reversed(list(processes)):
        while True:
            try:
                stop_process(process)
                break
            except KeyboardInterrupt:
                continue


def start_worker(site_file: str | os.PathLike, env: Mapping[str, str], *, keep_fds: tuple[int, ...] = (),
                 timeout: float = 120.0) -> subprocess.Popen | None:
    """Start the site worker of ``site_file`` (in the caller's process group) and wait until it
    listens; None (with one line on stderr) if it could not start: the ClientApp then does the
    rounds itself. ``keep_fds``: descriptors it inherits (the site's directory lock, so that
    the lock is held until the worker too is gone)."""
    from brainrecon.federation import channel
    from brainrecon.io import read_json

    state_dir = Path(read_json(Path(site_file))["state_dir"])
    channel.token_path(state_dir).unlink(missing_ok=True)
    process = subprocess.Popen([sys.executable, "-m", "brainrecon.federation.worker", "--site-file", str(site_file),
                                "--parent", str(os.getpid())], env=dict(env), stdin=subprocess.DEVNULL,
                               pass_fds=keep_fds)
    process.own_group = False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if channel.token_path(state_dir).is_file():
            return process
        time.sleep(0.1)
    if process.poll() is None:
        process.kill()
        process.wait()
    print(f"brainrecon site: the site worker did not start (exit code {process.returncode}); every round "
          f"runs in a fresh ClientApp process instead.", file=sys.stderr, flush=True)
    return None


def flower_bin(name: str) -> str:
    """The Flower command ``name`` of this Python's environment (else whichever is on PATH)."""
    require_flwr()
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def toml_string(value: str) -> str:
    return json.dumps(str(value))  # a JSON string literal is a valid TOML basic string


def owner_only(func):
    """Run ``func`` with umask 077: every file it and the processes it starts write (states,
    logs, Flower's database) is readable by its owner only."""
    import functools

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        previous = os.umask(0o077)
        try:
            return func(*args, **kwargs)
        finally:
            os.umask(previous)

    return wrapper


def raise_on_sigterm(once: bool = False):
    """Turn SIGTERM into KeyboardInterrupt so ``finally`` blocks stop our children.

    ``once``: only the first SIGTERM interrupts; later ones are swallowed by a Python handler,
    so the cleanup the first started (a pending state save) is not cut short. For a process
    that exits after its cleanup (it then keeps that handler: restoring the default while a
    second SIGTERM is pending makes Python print "Signal 15 ignored due to race condition").
    """
    if not _main_thread():
        return None

    def _interrupt(signum, frame):
        if once:
            signal.signal(signal.SIGTERM, _swallow)
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, _interrupt)


def _swallow(signum, frame) -> None:
    """A SIGTERM during the cleanup the first one started: nothing more to do."""


def restore_sigterm(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


__all__ = [
    "ADMITTED_ENV",
    "INSTALL_HINT",
    "DirectoryLock",
    "flower_bin",
    "flower_env",
    "flower_processes",
    "free_port",
    "owner_only",
    "raise_on_sigterm",
    "require_flwr",
    "restore_sigterm",
    "start_process",
    "start_worker",
    "stop_all",
    "stop_flower_processes",
    "stop_process",
    "toml_string",
    "wait_for_port",
]
