"""brainrecon: reconstruct the images a person saw from their fMRI responses."""

__version__ = "0.1.0"

from brainrecon.errors import BrainreconError  # noqa: E402

__all__ = ["BrainreconError", "__version__"]
