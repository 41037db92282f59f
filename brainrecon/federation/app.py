"""The Flower ServerApp and ClientApp of BrainGuard: the components Flower loads.

The app folder :func:`~brainrecon.federation.server.write_app` writes names them as
``brainrecon.federation.app:server_app`` and ``brainrecon.federation.app:client_app``
(:data:`~brainrecon.federation.server.APP_MODULE`). Without Flower installed both are None.
"""

from __future__ import annotations

from brainrecon.federation.site import site_train


def server_main(grid, context) -> None:
    """The ServerApp's body, :func:`brainrecon.federation.server.server_main` (imported here
    only when it runs: a site's ClientApp process, which loads this module too, stays free of
    torch)."""
    from brainrecon.federation.server import server_main as main

    main(grid, context)


def _build_apps():
    try:
        from flwr.clientapp import ClientApp
        from flwr.serverapp import ServerApp
    except ImportError:
        return None, None
    server, client = ServerApp(), ClientApp()
    server.main()(server_main)
    client.train()(site_train)
    return server, client


server_app, client_app = _build_apps()

__all__ = ["client_app", "server_app", "server_main"]
