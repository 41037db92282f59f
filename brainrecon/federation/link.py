"""The SuperLink a server runs: Flower's own, with its Control and Runtime APIs on loopback only.

Flower 1.42 serves its Fleet API (what sites use), its Control API (``flwr run``, ``flwr stop``,
``flwr supernode register``) and its Runtime API (the ServerApp's) on one ``--host/--port``.
Only the Fleet API may be reached from another machine: every other request whose peer is
not a loopback address is answered 403 before Flower sees it.

``python -m brainrecon.federation.link ARGS`` is ``flower-superlink ARGS`` with that rule.
"""

from __future__ import annotations

import ipaddress
import json
import sys

#: Path prefixes another machine may use: the Fleet API and the health check.
PUBLIC_PREFIXES = ("/v1/fleet", "/health")


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


class LoopbackOnly:
    """ASGI middleware: requests other than the Fleet API must come from loopback."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            path = scope.get("path", "")
            client = scope.get("client") or (None, None)
            if not path.startswith(PUBLIC_PREFIXES) and not is_loopback(client[0]):
                body = json.dumps({"detail": "The Control and Runtime APIs of this SuperLink are loopback only."}).encode()
                await send({"type": "http.response.start", "status": 403,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def _install_rule() -> None:
    from starlette.middleware import Middleware

    from flwr.superlink import extensions

    real = extensions.get_middleware
    extensions.get_middleware = lambda: (Middleware(LoopbackOnly), *real())


def main(argv: list[str] | None = None) -> None:
    _install_rule()
    from flwr.superlink.cli.flower_superlink import flower_superlink

    sys.argv = ["flower-superlink", *(sys.argv[1:] if argv is None else argv)]
    flower_superlink()


if __name__ == "__main__":
    main()


__all__ = ["LoopbackOnly", "PUBLIC_PREFIXES", "is_loopback", "main"]
