"""The SuperNode a site runs: Flower's own, except that it runs brainrecon's BrainGuard app only.

A SuperNode executes whatever Flower app (FAB) the SuperLink hands it. Flower's own app
verification (``--trusted-entities``) needs apps signed through Flower's platform, so a site
checks the app itself: the FAB it receives must be, byte for byte, the one
:func:`~brainrecon.federation.bundle.app_files` builds (its name, version and content hash).
Anything else is refused with one line, and Flower's error reply goes back, before the FAB is
stored, so no code of it ever runs at the site (Flower runs a ClientApp only from a stored FAB).

``python -m brainrecon.federation.node ARGS`` is ``flower-supernode ARGS`` with that check.
"""

from __future__ import annotations

import sys

from brainrecon.federation.bundle import app_refusal, expected_app_hash
from brainrecon.federation.supervise import ADMITTED_ENV


def _install_check() -> None:
    """Make Flower's SuperNode verify every new run's FAB with :func:`app_refusal`.

    Flower's own verification path does the refusing (an error reply, the FAB not stored);
    only the test it applies is replaced.
    """
    from flwr.supernode import start_client_internal as sci

    real_pull = sci._pull_and_store_message

    def pull(**kwargs):
        get_fab = kwargs["get_fab"]

        def checked_fab(fab_hash, run_id):
            fab = get_fab(fab_hash, run_id)
            reason = app_refusal(fab.content)
            if reason is not None:
                print(f"brainrecon site: run {run_id} {reason}.", file=sys.stderr, flush=True)
            # Flower verifies when trusted entities are given and the FAB is licensed;
            # the verdict is ours.
            fab.verifications = {"valid_license": "brainrecon", "brainrecon": "" if reason else "ok"}
            return fab

        kwargs.update(get_fab=checked_fab, trusted_entities={"brainrecon": "app-hash"})
        return real_pull(**kwargs)

    sci._pull_and_store_message = pull
    sci._verify_fab = lambda fab, trusted_entities: fab.verifications.get("brainrecon") == "ok"


def _install_admission_mark() -> None:
    """Write the file ``$BRAINRECON_SITE_ADMITTED`` names when the SuperLink gives this
    SuperNode its node id, so ``federate site`` can tell a server that restarted and forgot
    this site (reconnect) from one that never admitted it (stop, one line)."""
    import os
    from pathlib import Path

    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    mark = os.environ.get(ADMITTED_ENV)
    if not mark:
        return
    real = InMemoryNodeState.set_node_id

    def set_node_id(self, node_id):
        real(self, node_id)
        if node_id is not None:
            Path(mark).write_text(str(node_id), encoding="utf-8")

    InMemoryNodeState.set_node_id = set_node_id


def main(argv: list[str] | None = None) -> None:
    _install_check()
    _install_admission_mark()
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *(sys.argv[1:] if argv is None else argv)]
    flower_supernode()


if __name__ == "__main__":
    main()


__all__ = ["app_refusal", "expected_app_hash", "main"]
