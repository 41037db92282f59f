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

#: top-level module -> the extra that installs it
MODULE_EXTRA: dict[str, str] = {
    "diffusers": "diffusion",
    "transformers": "diffusion",
    "accelerate": "diffusion",
    "h5py": "nsd",
    "nibabel": "nsd",
    "flwr": "federated",
}

__all__ = ["MODULE_EXTRA", "missing_extra_message"]


def missing_extra_message(exc: BaseException) -> str | None:
    """For an ``ImportError`` of an optional module, the sentence naming the extra; else None."""
    name = getattr(exc, "name", None) or ""
    root = name.split(".")[0]
    if not isinstance(exc, ImportError) or root not in MODULE_EXTRA:
        return None
    extra = MODULE_EXTRA[root]
    return (f"this needs the optional package {root!r}, which is not installed: "
            f"pip install 'brainrecon[{extra}]' (or 'brainrecon[all]').")
