"""Named generation recipes: cited settings of the generators (``brainrecon reconstruct RUN --recipe NAME``).

A generation recipe belongs to one generator (``"ipadapter"``: SD 1.5 + IP-Adapter Plus, for runs of
the ``ipadapter`` target; ``"versatile"``: Versatile Diffusion dual-guided, for runs of the ``clip``
target), names its source and sets options of :func:`brainrecon.workflows.reconstruct.reconstruct_run`.
It is a :class:`brainrecon.recipes.Recipe` made with ``generator=``, the one recipe mechanism of
the decoders. Options given explicitly (not None) win over the recipe's values
(``Recipe.apply(..., none_is_unset=True)``); ``generation.json`` records the recipe.

``weadl``
    The deployed WeADL server (``IoanaGabor/bachelor-thesis`` @449f347f
    ``ai-server/vbd/reconstruction_service/{constants.py,stable_diffusion_image_reconstructor.py}``):
    Realistic Vision V4.0 (noVAE) with the ft-MSE VAE, DDIM (``clip_sample=False``,
    ``set_alpha_to_one=False``, ``steps_offset=1``), 100 steps, the pipeline's default guidance 7.5,
    IP-Adapter Plus at its default scale 1.0, no text (predicted tokens as ``prompt_embeds``).
    Its negative tokens are ``unconditional_embeddings.pt``: a run imported with
    ``brainrecon import brainguard --negative-tokens`` carries them, any other run uses the
    IP-Adapter weights' own unconditional tokens.
``mindbridge``
    MindBridge's inference settings (``littlepure2333/MindBridge`` @2a3943ff ``scripts/inference.sh``:
    guidance 5, ``text_image_ratio`` 0.5; ``src/options.py`` defaults: 20 steps, img2img strength 0.85;
    ``src/recon.py``: Versatile Diffusion dual-guided with UniPC). inference.sh's
    ``--recons_per_sample 8`` feeds the oracle selection below and is not taken over.
``brainguard-released``
    The defaults of the reconstruction function the released BrainGuard code carries
    (``kunzhan/BrainGuard`` @8d2b28e ``utils/utils.py`` ``reconstruction()``, MindBridge's function):
    UniPC, 50 steps, guidance 7.5, mix ratio 0.5, img2img strength 0.85.

Neither Versatile Diffusion recipe reproduces the released code's selection among several samples:
with ``recons_per_sample > 1`` it keeps the sample whose CLIP embedding is closest to the
**ground-truth** image's — an oracle that uses the answer, so brainrecon draws one sample per image.
"""

from __future__ import annotations

from brainrecon.errors import BrainreconError
from brainrecon.recipes import Recipe

GENERATORS = ("ipadapter", "versatile")
#: The generator a run's target space needs.
GENERATOR_OF_TARGET = {"ipadapter": "ipadapter", "clip": "versatile"}


_WEADL = "IoanaGabor/bachelor-thesis @449f347f ai-server/vbd/reconstruction_service"
_MINDBRIDGE = "littlepure2333/MindBridge @2a3943ff"
_BRAINGUARD = "kunzhan/BrainGuard @8d2b28e utils/utils.py reconstruction()"
#: MindBridge's Versatile Diffusion reconstruction; BrainGuard's released code runs the same
#: function with more steps and a higher guidance.
_MINDBRIDGE_VALUES = {"scheduler": "unipc", "steps": 20, "guidance_scale": 5.0, "mix_ratio": 0.5,
                      "img2img_strength": 0.85}

RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe(
        name="weadl", generator="ipadapter",
        source=f"{_WEADL} (constants.py, stable_diffusion_image_reconstructor.py); WeADL 2025",
        summary="WeADL's deployed generator: Realistic Vision V4.0 + ft-MSE VAE, DDIM 100 steps, no text.",
        values={"base_model": "SG161222/Realistic_Vision_V4.0_noVAE", "vae": "stabilityai/sd-vae-ft-mse",
                "scheduler": "ddim", "steps": 100, "guidance_scale": 7.5, "ip_adapter_scale": 1.0},
        notes={
            "base_model": f"{_WEADL}/constants.py: BASE_MODEL_PATH.",
            "vae": f"{_WEADL}/constants.py: VAE_MODEL_PATH.",
            "scheduler": f"{_WEADL}/constants.py: DDIM_CONFIG (clip_sample False, set_alpha_to_one False, steps_offset 1).",
            "steps": f"{_WEADL}/constants.py: INFERENCE_CONFIG num_inference_steps 100.",
            "guidance_scale": f"{_WEADL}/stable_diffusion_image_reconstructor.py: pipe(...) without guidance_scale: "
                              f"StableDiffusionPipeline's default 7.5.",
            "ip_adapter_scale": f"{_WEADL}/stable_diffusion_image_reconstructor.py: IPAdapterPlus(...) never calls "
                                f"set_scale: 1.0.",
        }),
    Recipe(
        name="mindbridge", generator="versatile",
        source=f"{_MINDBRIDGE} (scripts/inference.sh, src/options.py, src/recon.py, src/utils.py)",
        summary="MindBridge's inference defaults: Versatile Diffusion dual-guided, UniPC 20 steps, guidance 5.",
        values=_MINDBRIDGE_VALUES,
        notes={
            "steps": f"{_MINDBRIDGE} src/options.py: -num_inference_steps default 20 (inference.sh keeps it).",
            "guidance_scale": f"{_MINDBRIDGE} scripts/inference.sh: guidance=5.",
            "scheduler": f"{_MINDBRIDGE} src/recon.py: UniPCMultistepScheduler.",
            "mix_ratio": f"{_MINDBRIDGE} src/recon.py: mix_ratio 0.5 on every DualTransformer2DModel (text/image).",
            "img2img_strength": f"{_MINDBRIDGE} src/options.py: img2img_strength default .85 (used with a low-level image).",
        }),
    Recipe(
        name="brainguard-released", generator="versatile",
        source=f"{_BRAINGUARD} (MindBridge's reconstruction function)",
        summary="The released BrainGuard code's reconstruction defaults: UniPC 50 steps, guidance 7.5.",
        values={**_MINDBRIDGE_VALUES, "steps": 50, "guidance_scale": 7.5},
        notes={
            "steps": f"{_BRAINGUARD}: num_inference_steps=50.",
            "guidance_scale": f"{_BRAINGUARD}: guidance_scale=7.5.",
            "scheduler": f"{_BRAINGUARD} docstring/usage: UniPCMultistepScheduler (as MindBridge's recon.py).",
            "mix_ratio": f"{_BRAINGUARD} usage: DualTransformer2DModel mix_ratio 0.5.",
            "img2img_strength": f"{_BRAINGUARD}: img2img_strength=.85.",
        }),
)}


def get_generation_recipe(name: str) -> Recipe:
    """The generation recipe ``name``; a clear error lists the valid names."""
    if name not in RECIPES:
        raise BrainreconError(f"Unknown generation recipe {name!r}. Recipes: {', '.join(map(repr, sorted(RECIPES)))}.",
                              parameters=("recipe",))
    return RECIPES[name]


__all__ = ["GENERATORS", "GENERATOR_OF_TARGET", "RECIPES", "get_generation_recipe"]
