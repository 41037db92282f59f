"""CLIP's image normalisation constants (OpenAI CLIP), defined once: the ViT-H/14 encoder of
IP-Adapter (:func:`brainrecon.targets.ipadapter.clip_preprocess`), the CLIP metric of the evaluation
(:mod:`brainrecon.eval.preprocess`) and the ``clip`` target space
(:mod:`brainrecon.targets.clip_states`) all normalise with them."""

#: Per-channel (R, G, B) mean and standard deviation of CLIP's training images, on [0, 1] pixels.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

__all__ = ["CLIP_MEAN", "CLIP_STD"]
