"""The SuperNode a site runs: Flower's own, except that it runs brainrecon's BrainGuard app only.

A SuperNode executes whatever Flower app (FAB) the SuperLink hands it. Flower's own app
verification (``--trusted-entities``) needs apps signed through Flower's platform, so a site
checks the app itself: the FAB it receives must be, byte for byte, the one
:func:`~brainrecon.federation.server.app_files` builds (its name, version and content hash).
Anything else is refused with one line, and Flower's error reply goes back, before the FAB is
stored, so no code of it ever runs at the site (Flower runs a ClientApp only from a stored FAB).

``python -m brainrecon.federation.node ARGS`` is ``flower-supernode ARGS`` with that check.
"""

from __future__ import annotations

import hashlib
import io
import sys
import zipfile

import tomllib

from brainrecon.federation.server import APP_NAME, APP_VERSION, app_files

_EXPECTED: str | None = None


def expected_app_hash() -> str:
    """SHA-256 of the FAB Flower builds from brainrecon's BrainGuard app (what the server ships)."""
    global _EXPECTED
    if _EXPECTED is None:
        from flwr.cli.build import build_fab_from_files

        _EXPECTED = hashlib.sha256(build_fab_from_files(app_files())[0]).hexdigest()
    return _EXPECTED


def _describe(content: bytes) -> str:
    """Name and version a FAB declares (read as data, never imported)."""
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as fab:
            project = tomllib.loads(fab.read("pyproject.toml").decode("utf-8")).get("project", {})
        return f"'{project.get('name', '?')}' {project.get('version', '?')}"
    except Exception:  # noqa: BLE001 - anything unreadable is simply not our app
        return "an unreadable app"


def app_refusal(content: bytes, who: str = "this site") -> str | None:
    """Why ``who`` refuses to run the FAB ``content``; None for brainrecon's BrainGuard app."""
    found = hashlib.sha256(content).hexdigest()
    if found == expected_app_hash():
        return None
    return (f"refused to run {_describe(content)} (sha256 {found[:16]}): {who} runs only "
            f"brainrecon's '{APP_NAME}' {APP_VERSION} (sha256 {expected_app_hash()[:16]}, same brainrecon "
            f"and flwr versions as the server)")


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


def main(argv: list[str] | None = None) -> None:
    _install_check()
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *(sys.argv[1:] if argv is None else argv)]
    flower_supernode()


if __name__ == "__main__":
    main()


__all__ = ["app_refusal", "expected_app_hash", "main"]
