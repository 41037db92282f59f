"""The local channel between a site's Flower ClientApp and its long-lived site worker.

Flower 1.42 starts a fresh ``flwr-clientapp`` process for every message a SuperNode receives
(``flwr/supernode/runtime/run_clientapp.py`` handles one message and exits; the warm executors
of ``flwr/supercore/superexec`` are Kubernetes pods for agent, model and connector apps only,
and each takes one task). ``brainrecon federate site`` therefore keeps the site itself — its
data, model, optimiser and state — in a worker process of its own
(:mod:`brainrecon.federation.worker`), and the ClientApp only hands it the received arrays and
returns its upload.

The channel is a Unix-domain socket in the site's state directory (owner-only: ``0700``
directory, ``0600`` socket), never a TCP port. A state directory whose path is too long for a
socket address (``sun_path``: 108 bytes on Linux, 104 on macOS) gets its socket in a private
``0700`` temporary directory instead, named in the token file. A connection is accepted only from a process of
the same user (``SO_PEERCRED`` where the platform has it) that first presents the worker's
random token, read from an owner-only file beside the socket; anything else is answered with a
refusal and closed. A frame is an 8-byte length, a JSON header, then the raw bytes of the
arrays the header lists (Flower's own ``.npy`` serialisation of each array, unchanged).

Imports nothing heavy: the ClientApp process that uses it does not import torch.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import socket
import struct
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from brainrecon.errors import BrainreconError

SOCKET_NAME = "worker.sock"
TOKEN_NAME = "worker.token"
_LENGTH = struct.Struct(">Q")
_MAX_HEADER = 64 * 2**20
_MAX_SOCKET_PATH = 104  # bytes: sun_path is 108 on Linux, 104 on macOS (with its terminating NUL)
PRIVATE_PREFIX = "brainrecon-site-"


class WorkerUnavailable(Exception):
    """No site worker answers (none started, it exited, or it refused this caller)."""


def socket_path(state_dir: str | os.PathLike) -> Path:
    return Path(state_dir) / SOCKET_NAME


def token_path(state_dir: str | os.PathLike) -> Path:
    return Path(state_dir) / TOKEN_NAME


# --------------------------------------------------------------------------- frames
def send_frame(sock: socket.socket, header: dict[str, Any], blobs: Sequence[bytes | memoryview] = ()) -> None:
    """Send ``header`` (JSON) and ``blobs`` (their sizes go in the header as ``blobs``)."""
    head = json.dumps({**header, "blobs": [len(b) for b in blobs]}).encode("utf-8")
    sock.sendall(_LENGTH.pack(len(head)) + head)
    for blob in blobs:
        sock.sendall(blob)


def _recv_exactly(sock: socket.socket, n: int) -> bytearray:
    buffer = bytearray(n)
    view, got = memoryview(buffer), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError(f"the other end closed the channel after {got} of {n} bytes")
        got += k
    return buffer


def recv_frame(sock: socket.socket) -> tuple[dict[str, Any], list[bytes]]:
    """Receive one frame: its header and its blobs (as ``bytes``, in order)."""
    (size,) = _LENGTH.unpack(bytes(_recv_exactly(sock, _LENGTH.size)))
    if size > _MAX_HEADER:
        raise ConnectionError(f"a channel header of {size} bytes is not one of ours")
    header = json.loads(bytes(_recv_exactly(sock, size)).decode("utf-8"))
    blobs = [bytes(_recv_exactly(sock, int(n))) for n in header.pop("blobs", [])]
    return header, blobs


# --------------------------------------------------------------------------- worker side
def listen(state_dir: str | os.PathLike) -> tuple[socket.socket, str]:
    """Bind the worker's socket in ``state_dir`` and write a fresh token; owner-only both.

    A socket or token left by a worker that died is replaced. Returns the listening socket
    and the token a caller must present.
    """
    state_dir = Path(state_dir)
    path, token_file = socket_path(state_dir), token_path(state_dir)
    if len(os.fsencode(path)) >= _MAX_SOCKET_PATH:
        path = Path(tempfile.mkdtemp(prefix=PRIVATE_PREFIX)) / SOCKET_NAME  # mkdtemp: 0700, this user's
    path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    previous = os.umask(0o177)
    try:
        server.bind(str(path))
    finally:
        os.umask(previous)
    os.chmod(path, 0o600)
    server.listen(4)
    token = secrets.token_hex(32)
    partial = token_file.with_name(f".{token_file.name}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(f"{token}\n{path}\n")
    os.replace(partial, token_file)
    return server, token


def close(server: socket.socket, state_dir: str | os.PathLike) -> None:
    """Stop listening: close ``server`` and remove its socket (and its private directory, if it
    had one) and the token file."""
    path = Path(server.getsockname())
    server.close()
    path.unlink(missing_ok=True)
    if path.parent.name.startswith(PRIVATE_PREFIX) and path.parent != Path(state_dir):
        try:
            path.parent.rmdir()
        except OSError:
            pass
    token_path(state_dir).unlink(missing_ok=True)


def _read_token(state_dir: str | os.PathLike) -> tuple[str, Path]:
    """The token and the socket address the worker of ``state_dir`` wrote (a one-line file: the
    socket is in the state directory)."""
    lines = token_path(state_dir).read_text(encoding="utf-8").splitlines()
    token = lines[0].strip() if lines else ""
    address = Path(lines[1].strip()) if len(lines) > 1 and lines[1].strip() else socket_path(state_dir)
    return token, address


def same_user(conn: socket.socket) -> bool:
    """Whether the peer of ``conn`` runs as this process's user (True where unknowable)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return True  # not Linux: the owner-only directory and the token still apply
    creds = conn.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid == os.getuid()


def authenticate(conn: socket.socket, token: str) -> tuple[dict[str, Any], list[bytes]] | None:
    """The caller's first frame if it comes from this user with ``token``; else refuse and None."""
    if not same_user(conn):
        _refuse(conn, "another user")
        return None
    header, blobs = recv_frame(conn)
    if not hmac.compare_digest(str(header.pop("token", "")).encode(), token.encode()):
        _refuse(conn, "a wrong token")
        return None
    return header, blobs


def _refuse(conn: socket.socket, why: str) -> None:
    try:
        send_frame(conn, {"refused": f"this site worker refuses {why}"})
    except OSError:
        pass


# --------------------------------------------------------------------------- caller side
def call(state_dir: str | os.PathLike, header: dict[str, Any], blobs: Sequence[bytes] = (),
         *, connect_timeout: float = 5.0) -> tuple[dict[str, Any], list[bytes]]:
    """One request to the site worker of ``state_dir``: its reply's header and blobs.

    Raises
    ------
    WorkerUnavailable
        No worker listens there, its token is unreadable, or it refused this caller (nothing
        was done: the caller may do the work itself).
    BrainreconError
        The worker took the request and failed (its message), or the channel broke mid-way.
    """
    try:
        token, address = _read_token(state_dir)
    except OSError as exc:
        raise WorkerUnavailable(f"no site worker token in {state_dir} ({exc.strerror})") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(connect_timeout)
        try:
            sock.connect(str(address))
        except OSError as exc:
            raise WorkerUnavailable(f"no site worker answers at {address} ({exc})") from None
        sock.settimeout(None)  # a round takes as long as its training
        try:
            send_frame(sock, {**header, "token": token}, blobs)
            reply, out = recv_frame(sock)
        except (OSError, ValueError) as exc:
            raise BrainreconError(f"The site worker stopped during the request ({exc}); "
                                  f"`brainrecon federate site` restarts it, and the server redoes the round.") from None
    finally:
        sock.close()
    if "refused" in reply:
        raise WorkerUnavailable(reply["refused"])
    if "error" in reply:
        raise BrainreconError(reply["error"])
    return reply, out


__all__ = ["SOCKET_NAME", "TOKEN_NAME", "WorkerUnavailable", "authenticate", "call", "close", "listen", "recv_frame",
           "same_user", "send_frame", "socket_path", "token_path"]
