"""BrainGuard: privacy-preserving multi-subject MLP decoders trained by federated learning.

``model``      the network, the loss, the output-scale calibration;
``federated``  clients, the server's :func:`aggregate`, the Dynamic Fusion Learner, the round
               loop;
``checkpoint`` the training checkpoint format, and resuming from the newest intact one;
``training``   the checked configuration, each site's data, the initial models;
``decoder``    :class:`BrainGuardDecoder`, the registered ``brainguard`` decoder;
``official``   the converter of the released BrainGuard and WeADL files, and ``loader`` the
               decoder's ``from_official`` (:class:`~.loader.FromOfficialMixin`);
``recipes``    the named recipes ``brainguard-released`` and ``weadl``, each value cited.

The same protocol across processes and machines on Flower (optional extra
``brainrecon[federated]``: ServerApp, ClientApp, process supervision, the loopback launcher) is
application work, in :mod:`brainrecon.federation`; it uses the protocol code of ``federated``.

Method: Tian et al., "BrainGuard", AAAI 2025 (arXiv 2501.14309); released code
``kunzhan/BrainGuard``.
"""

from brainrecon.decoders.brainguard.decoder import BrainGuardDecoder
from brainrecon.decoders.brainguard.federated import (
    Client,
    DynamicFusionLearner,
    TrainConfig,
    aggregate,
    aggregation_weights,
)
from brainrecon.decoders.brainguard.model import (
    BrainGuardNet,
    apply_calibration,
    brainguard_loss,
    fit_calibration,
    soft_clip_loss,
    split_tiers,
    token_shape,
)

__all__ = [
    "BrainGuardDecoder",
    "BrainGuardNet",
    "Client",
    "DynamicFusionLearner",
    "TrainConfig",
    "aggregate",
    "aggregation_weights",
    "apply_calibration",
    "brainguard_loss",
    "fit_calibration",
    "soft_clip_loss",
    "split_tiers",
    "token_shape",
]
