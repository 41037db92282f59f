"""Optional dependencies, grouped in extras, and the one-line message when one is missing.

The core install (``pip install brainrecon``) fits ridge and BrainGuard, evaluates PixCorr
and SSIM and runs the demo on synthetic data. The rest is in extras:

======================  ==========================================  ===========================
extra                   packages                                    for
======================  ==========================================  ===========================
``diffusion``           diffusers, transformers, accelerate         NeuroPictor, IP-Adapter
                                                                    images and targets, the
                                                                    CLIP metric
``nsd``                 h5py, nibabel                               preparing and reading NSD
``federated``           flwr                                        BrainGuard on Flower
``all``                 all of the above
``test``                all of the above + pytest, pandas, timm,    the test suite
                        mkdocs
======================  ==========================================  ===========================
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

#: top-level module -> the extra that installs it
MODULE_EXTRA: dict[str, str] = {
    "diffusers": "diffusion",
    "transformers": "diffusion",
    "accelerate": "diffusion",
    "h5py": "nsd",
    "nibabel": "nsd",
    "flwr": "federated",
}


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A package's module ``__getattr__`` (PEP 562) for names imported on first use.

    ``exports`` maps each name to the module that defines it; ``package.NAME`` then imports that
    module only when asked, so importing the package costs nothing heavy (torch, diffusers,
    Flower). Each access reads the module's current attribute (a patched one included)::

        __getattr__ = lazy_exports(__name__, {"serve": "brainrecon.federation.server"})
    """

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


__all__ = ["MODULE_EXTRA", "lazy_exports", "missing_extra_message"]


def missing_extra_message(exc: BaseException) -> str | None:
    """For an ``ImportError`` of an optional module, the sentence naming the extra; else None."""
    name = getattr(exc, "name", None) or ""
    root = name.split(".")[0]
    if not isinstance(exc, ImportError) or root not in MODULE_EXTRA:
        return None
    extra = MODULE_EXTRA[root]
    return (f"this needs the optional package {root!r}, which is not installed: "
            f"pip install 'brainrecon[{extra}]' (or 'brainrecon[all]').")
