"""When progress bars show: one rule for every bar brainrecon draws.

A bar is off when the caller turns it off, when ``TQDM_DISABLE`` is set to a true value (also
set by ``brainrecon --quiet``), and — tqdm's own rule for ``disable=None`` — when the output is
not a terminal.
"""

from __future__ import annotations

import os


def bar_disabled(progress: bool | None = True) -> bool | None:
    """The ``disable=`` value for ``tqdm``: True (off) or None (on where stderr is a terminal)."""
    if progress is False:
        return True
    if os.environ.get("TQDM_DISABLE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return True
    return None
