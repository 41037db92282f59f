"""Generators: predicted target values -> images.

``ipadapter``
    Stable Diffusion 1.5 with IP-Adapter Plus, fed predicted post-projection tokens
    (:class:`~brainrecon.generate.ipadapter.IPAdapterGenerator`; a run is reconstructed by
    :func:`brainrecon.workflows.reconstruct.reconstruct_run`, ``brainrecon reconstruct RUN``).

Pixel targets need no generator (:meth:`brainrecon.targets.PixelTarget.to_images`);
NeuroPictor produces images itself. Heavy imports (torch, diffusers) happen on first use.
"""

from __future__ import annotations

from brainrecon.extras import lazy_exports

__all__ = ["DEFAULT_BASE_MODEL", "SCHEDULERS", "IPAdapterGenerator"]

__getattr__ = lazy_exports(__name__, {name: "brainrecon.generate.ipadapter" for name in __all__})
