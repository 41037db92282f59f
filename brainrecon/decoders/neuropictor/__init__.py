"""NeuroPictor (Huo et al., ECCV 2024) on diffusers: fMRI surface maps modulate Stable Diffusion 2.1.

Modules: :mod:`.encoder` (fMRI ViT autoencoder), :mod:`.semantic` (high-level guiding
network), :mod:`.control` (feature transformation inside a ControlNet), :mod:`.model`
(frozen SD components, assembly, parameter counts), :mod:`.train` (the stage training
loop, ``accelerate``), :mod:`.checkpoint` (the loop's resumable checkpoints), :mod:`.plan`
(per-stage settings, batch, steps, processes), :mod:`.networks` (building, saving and loading
the networks of a stage), :mod:`.sample` (DDIM with guidance on the semantics only),
:mod:`.decoder` (:class:`NeuroPictorDecoder`), with its mixins :mod:`.reconstruction`
(reconstructing images) and :mod:`.loader` (``from_official``, loading a released file),
:mod:`.official` (the converter of the released models' tensors) and :mod:`.official_encoder`
(reading the released fMRI autoencoder).
"""

from brainrecon.decoders.neuropictor.decoder import NeuroPictorDecoder
from brainrecon.decoders.neuropictor.model import (
    component_parameter_counts,
    describe_text,
)
from brainrecon.decoders.neuropictor.official import load_official_encoder

__all__ = ["NeuroPictorDecoder", "component_parameter_counts", "describe_text", "load_official_encoder"]
