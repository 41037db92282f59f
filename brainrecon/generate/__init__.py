"""Generators: predicted target values -> images.

``ipadapter``
    Stable Diffusion 1.5 with IP-Adapter Plus, fed predicted post-projection tokens
    (:class:`~brainrecon.generate.ipadapter.IPAdapterGenerator`; a run is reconstructed by
    :func:`brainrecon.workflows.reconstruct.reconstruct_run`, ``brainrecon reconstruct RUN``).

Pixel targets need no generator (:meth:`brainrecon.targets.PixelTarget.to_images`);
NeuroPictor produces images itself. Heavy imports (torch, diffusers) happen on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DEFAULT_BASE_MODEL", "SCHEDULERS", "IPAdapterGenerator"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from brainrecon.generate import ipadapter

        return getattr(ipadapter, name)
    raise AttributeError(f"module 'brainrecon.generate' has no attribute {name!r}")
