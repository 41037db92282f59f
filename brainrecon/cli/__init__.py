"""The ``brainrecon`` command line: thin commands over library functions, one module per
command group (:mod:`~brainrecon.cli.fit`, :mod:`~brainrecon.cli.evaluate`, ...), all on the
one typer ``app`` of :mod:`brainrecon.cli.common`.

Domain errors (:class:`~brainrecon.errors.BrainreconError`) print one red line and exit
with code 1; set ``BRAINRECON_DEBUG=1`` to see the traceback.
"""

from __future__ import annotations

from brainrecon.cli.common import app, console, err_console, main, _subjects_option  # noqa: F401

# Importing a command module registers its commands on ``app`` (in the order of `brainrecon --help`).
from brainrecon.cli import info  # noqa: E402,F401  decoders, data
from brainrecon.cli.federate import federate_app  # noqa: E402

app.add_typer(federate_app, name="federate")

from brainrecon.cli import fit, evaluate, generate, prepare, imports  # noqa: E402,F401

__all__ = ["app", "main"]
