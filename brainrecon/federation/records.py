"""What crosses the wire between a site and the server, and the check that nothing else does.

A site's reply holds two records: ``arrays`` (its shared tensors, never a subject-specific
``ridge.*`` one) and ``metrics`` (only its sample count, ``num-examples``, and its subject number, ``subject``); the server's
instruction holds the global shared tensors and a ``config`` record.
"""

from __future__ import annotations

from collections.abc import Iterable

from brainrecon.errors import BrainreconError

ARRAYS, METRICS, CONFIG = "arrays", "metrics", "config"
NUM_EXAMPLES = "num-examples"
#: The site's subject number: the server admits one site per subject.
SUBJECT = "subject"


def check_upload(arrays: Iterable[str], metrics: Iterable[str], *, site: str = "a site") -> None:
    """Refuse an upload that is not exactly shared tensors and a sample count.

    Raises
    ------
    BrainreconError
        Naming the private tensors (``ridge.*``) or the extra metric entries found.
    """
    from brainrecon.decoders.brainguard.model import (
        is_private,  # torch: not for a ClientApp that only relays
    )

    private = [k for k in arrays if is_private(k)]
    if private:
        raise BrainreconError(
            f"Upload from {site} contains subject-specific tensor(s) {private}; the input layer "
            f"must stay at its site (retention tier). The upload was refused."
        )
    extra = sorted(set(metrics) - {NUM_EXAMPLES, SUBJECT})
    if extra:
        raise BrainreconError(
            f"Upload from {site} carries metric(s) {extra}; a site sends only its shared tensors "
            f"and '{NUM_EXAMPLES}'. The upload was refused."
        )


__all__ = ["ARRAYS", "CONFIG", "METRICS", "NUM_EXAMPLES", "SUBJECT", "check_upload"]
