"""The paper's manipulation figures from a NeuroPictor run: semantics swap and control-scale sweep."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from brainrecon.errors import BrainreconError


def parse_pairs(items: Sequence[str]) -> list[tuple[int, int]]:
    """``["3:7", "0:1"]`` -> ``[(3, 7), (0, 1)]`` (test-set positions, semantics:structure)."""
    pairs = []
    for item in items:
        a, sep, b = str(item).partition(":")
        try:
            if not sep:
                raise ValueError
            pairs.append((int(a), int(b)))
        except ValueError:
            raise BrainreconError(
                f"--swap-semantics expects A:B (test-image positions: semantics from A, structure "
                f"from B), got {item!r}."
            ) from None
    return pairs


def parse_floats(text: str, what: str = "--control-sweep") -> list[float]:
    """``"0,0.25,1"`` -> ``[0.0, 0.25, 1.0]``."""
    try:
        values = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise BrainreconError(f"{what} expects comma-separated numbers, e.g. 0,0.25,0.5,0.75,1; got {text!r}.") from None
    if not values:
        raise BrainreconError(f"{what} is empty; give comma-separated numbers, e.g. 0,0.5,1.")
    return values


def run_figures(
    run: str | os.PathLike,
    *,
    swap_pairs: Sequence[tuple[int, int]] | None = None,
    scales: Sequence[float] | None = None,
    indices: Sequence[int] = (0, 1, 2, 3),
    out_dir: str | os.PathLike | None = None,
    data: str | os.PathLike | None = None,
) -> dict[str, Path]:
    """Write the swap and/or control-sweep grids of a NeuroPictor run.

    Parameters
    ----------
    run : path
        Run directory written by ``brainrecon fit --decoder neuropictor``.
    swap_pairs : sequence of (a, b), optional
        Test-image positions: semantics (context) from ``a``, structure (ControlNet hint) from ``b``
        (the paper's Fig. 2 / 7). Grid columns: image ``b``, image ``a``, the swap result.
    scales : sequence of float, optional
        Control scales for the sweep (Fig. 1 / 6): one column per scale after ground truth.
    indices : sequence of int
        Test-image positions of the sweep rows.
    out_dir : path, optional
        Where the PNGs go (default: the run directory).
    data : path, optional
        The run's data if it moved (checked by fingerprint).

    Returns
    -------
    dict
        ``"swap_semantics"`` / ``"control_sweep"`` -> written PNG path.
    """
    from brainrecon.runs import Run
    from brainrecon.viz import image_grid

    if not swap_pairs and not scales:
        raise BrainreconError("Nothing to draw: give --swap-semantics A:B and/or --control-sweep 0,0.5,1.")
    r = Run.open(run)
    if r.info.get("decoder") != "neuropictor":
        raise BrainreconError(f"{run} is a {r.info.get('decoder')!r} run; these figures need a NeuroPictor run.")
    decoder = r.load_decoder()
    test = r.dataset(data).test
    subject = r.subject
    out_dir = Path(out_dir) if out_dir is not None else r.path
    written = {}
    if swap_pairs:
        swapped = decoder.swap_semantics(test, subject, swap_pairs)
        a = [p[0] for p in swap_pairs]
        b = [p[1] for p in swap_pairs]
        written["swap_semantics"] = out_dir / "swap_semantics.png"
        image_grid(test.images(subject, b), {"semantics from": test.images(subject, a), "swap": swapped},
                   written["swap_semantics"], max_rows=len(swap_pairs), gt_label="structure from",
                   row_labels=[f"{x}:{y}" for x, y in swap_pairs])
    if scales:
        sweep = decoder.control_sweep(test, subject, list(indices), list(scales))
        written["control_sweep"] = out_dir / "control_sweep.png"
        image_grid(test.images(subject, list(indices)),
                   {f"alpha={s:g}": sweep[:, j] for j, s in enumerate(scales)},
                   written["control_sweep"], max_rows=len(indices),
                   row_labels=[str(i) for i in indices])
    return written
