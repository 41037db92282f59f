"""The site worker: one long-lived process that holds a site between Flower messages.

Flower 1.42 runs every message a SuperNode receives in a fresh ``flwr-clientapp`` process, and
offers nothing to keep one alive (see :mod:`.channel`). Rebuilding the site in each of them —
importing torch, loading and standardising the subject's data, building the model, restoring
the state and saving it again — costs about 10 s per message at NSD size
(``benchmarks/RESULTS.md``). ``brainrecon federate site`` therefore starts this worker beside
its SuperNode. It keeps one :class:`~brainrecon.federation.site.Site` in memory and answers the
ClientApp's requests over the owner-only channel, one at a time:

- a round continues from the state in memory; the state is saved after the reply has left, in
  a thread the next round waits for (atomic, its JSON marker last, as before), and the global
  model received is saved while the site trains, so a site stopped between its reply and its
  save redoes that round on restart and resumes exactly;
- a request with other parameters or data (a new federation), or for a round that does not
  follow the state in memory (a redone round, a server restarted with ``--resume``), rebuilds the
  site from its state directory, as the ClientApp would.

It exits when ``federate site`` stops it (SIGTERM or Ctrl-C: a pending save is finished first)
or when its parent is gone.

``python -m brainrecon.federation.worker --site-file FILE --parent PID``
"""

from __future__ import annotations

import argparse
import io
import json
import os
import threading
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from brainrecon.errors import BrainreconError
from brainrecon.federation import channel
from brainrecon.federation.site import Site
from brainrecon.federation.supervise import raise_on_sigterm
from brainrecon.io import read_json

NPY = "numpy.ndarray"  # Flower's serialisation type of an array: the bytes of numpy.save


class SiteWorker:
    """Answers the ClientApp's requests for one site (``site_file``: its settings)."""

    def __init__(self, site_file: str | os.PathLike, make_site: Callable[[Mapping, Mapping], Site] = Site):
        self.site_file = Path(site_file)
        self.make_site = make_site
        self.site: Site | None = None
        self.key: str | None = None

    def handle(self, header: Mapping[str, Any], blobs: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
        if header.get("op") == "ping":
            return {"pid": os.getpid()}, []
        if header.get("op") != "round":
            raise BrainreconError(f"The site worker does not know the request {header.get('op')!r}.")
        return self.round(header, blobs)

    def round(self, header: Mapping[str, Any], blobs: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
        import numpy as np
        import torch

        settings = read_json(self.site_file)
        settings["recipe"] = settings.get("recipe") or header.get("recipe")
        params = json.loads(str(header["params"]))
        round_number = int(header["round"])
        key = json.dumps([settings, params], sort_keys=True, default=str)
        if self.site is not None:
            self.site.wait_saved()
        if self.site is None or key != self.key or self.site.rounds_completed != round_number - 1:
            self.site = None  # its memory first
            self.site = self.make_site(settings, params)
            self.key = key
        names = header["arrays"]
        if len(names) != len(blobs) or any(stype != NPY for _, stype in names):
            raise BrainreconError("The site worker takes only Flower's numpy arrays, one per name.")
        global_state = None if not blobs else {
            name: torch.from_numpy(np.load(io.BytesIO(blob), allow_pickle=False))
            for (name, _), blob in zip(names, blobs)}
        upload, n_samples = self.site.answer(round_number, int(header["rounds"]), int(header["sites"]),
                                             global_state, background=True)
        arrays, out = [], []
        for name, tensor in upload.items():
            value = tensor.detach().cpu().numpy()
            buffer = io.BytesIO()
            np.save(buffer, value, allow_pickle=False)  # what Flower's Array.from_numpy_ndarray stores
            arrays.append([name, str(value.dtype), list(value.shape)])
            out.append(buffer.getvalue())
        return {"arrays": arrays, "num_examples": int(n_samples), "subject": self.site.subject}, out

    def close(self) -> None:
        """Finish a pending state save."""
        if self.site is not None:
            self.site.wait_saved()


def serve(site_file: str | os.PathLike, *, parent: int | None = None, stop: threading.Event | None = None,
          make_site: Callable[[Mapping, Mapping], Site] = Site) -> None:
    """Answer requests on the channel of the site's state directory until stopped.

    ``parent``: exit once this process is no longer the parent; ``stop``: exit once set.
    """
    settings = read_json(Path(site_file))
    state_dir = Path(settings["state_dir"])
    worker = SiteWorker(site_file, make_site)
    server, token = channel.listen(state_dir)
    server.settimeout(1.0)
    try:
        while not (stop is not None and stop.is_set()):
            if parent is not None and os.getppid() != parent:
                break
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(None)
                try:
                    first = channel.authenticate(conn, token)
                except (OSError, ValueError):
                    continue
                if first is None:
                    continue
                try:
                    reply = worker.handle(*first)
                except BrainreconError as exc:
                    reply = ({"error": str(exc)}, [])
                except Exception as exc:  # noqa: BLE001 - the site's log gets the traceback, the ClientApp one line
                    traceback.print_exc()
                    reply = ({"error": f"The site worker failed: {type(exc).__name__}: {exc}"}, [])
                try:
                    channel.send_frame(conn, *reply)
                except OSError:
                    pass  # the ClientApp went away; the state is saved all the same
    finally:
        try:
            worker.close()
        finally:
            channel.close(server, state_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m brainrecon.federation.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--site-file", required=True)
    parser.add_argument("--parent", type=int)
    args = parser.parse_args(argv)
    # Imported before the first message, not during it.
    import torch  # noqa: F401

    import brainrecon.decoders.brainguard.decoder  # noqa: F401
    # SIGTERM (``federate site`` stopping it, or its whole process group) ends the loop; a second
    # one while a state save finishes is swallowed, and the handler is not restored: the process
    # ends here.
    raise_on_sigterm(once=True)
    try:
        serve(args.site_file, parent=args.parent)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()


__all__ = ["SiteWorker", "main", "serve"]
