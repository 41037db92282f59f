"""The SuperLink a server runs: Flower's own, with two rules in front of it.

Flower 1.42 serves its Fleet API (what sites use), its Control API (``flwr run``, ``flwr stop``,
``flwr supernode register``) and its Runtime API (the ServerApp's) on one ``--host/--port``.

1. Only the Fleet API (and the health check) may be reached from another machine: every other
   request whose peer is not a loopback address is answered 403 before Flower sees it.
2. The Control API starts one run, and only brainrecon's BrainGuard app: a ``start-run`` whose
   Flower app bundle (FAB) is not, byte for byte, the one this brainrecon builds
   (:func:`~brainrecon.federation.bundle.app_refusal`), or any ``start-run`` after the first, is
   answered 403 with one line. So even a process on the server's own machine cannot make the
   sites' SuperNodes (which refuse foreign apps anyway) or this server run other code, nor
   start brainrecon's app a second time with a run configuration of its own.
3. Until the server has registered the sites' keys (the file ``$BRAINRECON_FLEET_GATE`` names
   exists), the Fleet API answers 503, which a SuperNode retries.

``python -m brainrecon.federation.link ARGS`` is ``flower-superlink ARGS`` with those rules.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys

#: Path prefixes another machine may use: the Fleet API and the health check.
PUBLIC_PREFIXES = ("/v1/fleet/", "/health")
#: The Control API call that starts a run (its body: a protobuf ``StartRunRequest``).
START_RUN = "/v1/control/start-run"


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host is None:
        return False
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


#: Environment variable naming a file: until it exists the Fleet API answers 503 (retry later),
#: so that sites connecting while the server registers their keys are not refused.
FLEET_GATE_ENV = "BRAINRECON_FLEET_GATE"


def _fleet_open() -> bool:
    gate = os.environ.get(FLEET_GATE_ENV)
    return not gate or os.path.exists(gate)


async def _refuse(send, reason: str, status: int = 403) -> None:
    body = json.dumps({"detail": reason}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _start_run_refusal(body: bytes) -> str | None:
    """Why a ``start-run`` request with this body is refused; None for brainrecon's app."""
    from flwr.proto.control_pb2 import StartRunRequest

    from brainrecon.federation.bundle import app_refusal

    request = StartRunRequest()
    try:
        request.ParseFromString(body)
    except Exception:  # noqa: BLE001 - anything unparsable is simply refused
        return "refused an unreadable start-run request"
    content = request.fab.content
    if not content:
        return "refused a run without its app bundle (this SuperLink starts only brainrecon's app, sent in full)"
    return app_refusal(bytes(content), who="this SuperLink")


class LoopbackOnly:
    """ASGI middleware for the two rules of this module (one instance per SuperLink)."""

    def __init__(self, app):
        self.app = app
        self.runs_started = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        client = scope.get("client") or (None, None)
        if not path.startswith(PUBLIC_PREFIXES) and not is_loopback(client[0]):
            return await _refuse(send, "The Control and Runtime APIs of this SuperLink are loopback only.")
        if path.startswith("/v1/fleet/") and not _fleet_open():
            # Sites retry on 503: none is turned away before its key is registered.
            return await _refuse(send, "This server is starting; try again.", status=503)
        if path.rstrip("/") != START_RUN:
            return await self.app(scope, receive, send)
        # Read the whole request, judge it, then hand Flower the same bytes.
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return None  # the client went away
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        reason = _start_run_refusal(body)
        if reason is None and self.runs_started:
            reason = "refused a second run: this SuperLink runs the one federation it was started for"
        if reason is not None:
            print(f"brainrecon server: {reason}.", file=sys.stderr, flush=True)
            return await _refuse(send, reason)
        self.runs_started += 1
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


def _install_rules() -> None:
    from flwr.superlink import extensions
    from starlette.middleware import Middleware

    real = extensions.get_middleware
    extensions.get_middleware = lambda: (Middleware(LoopbackOnly), *real())


def main(argv: list[str] | None = None) -> None:
    _install_rules()
    from flwr.superlink.cli.flower_superlink import flower_superlink

    sys.argv = ["flower-superlink", *(sys.argv[1:] if argv is None else argv)]
    flower_superlink()


if __name__ == "__main__":
    main()


__all__ = ["FLEET_GATE_ENV", "PUBLIC_PREFIXES", "START_RUN", "LoopbackOnly", "is_loopback", "main"]
