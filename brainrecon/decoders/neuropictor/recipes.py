"""NeuroPictor's named recipes: the released training and sampling settings, and the paper's.

``neuropictor-released`` reproduces the official code (jingyanghuo/neuropictor @5e1584a:
``models/{pretrain,pretrain_mask,finetune,finetune_mask,inference}.yaml``, ``train.py``,
``cldm/cldm_fmri_pret.py``, ``cldm/cldm_fmri_surf.py``, ``reconstruction.py``,
``dataset/dataset.py``) and the epoch counts of the released checkpoints (README: the
``epoch_080.pth`` pre-trained models, the ``epoch_015.pth`` per-subject models).
``neuropictor-paper`` is the same except where the paper (Huo et al., "NeuroPictor", ECCV 2024,
§4.1 implementation details) says otherwise.

Stage-dependent values are per-stage mappings keyed by the official yaml names
(``pretrain``, ``pretrain_mask``, ``finetune``, ``finetune_mask``); brainrecon's stage
``"cfg"`` reads ``pretrain_mask`` or ``finetune_mask`` by the model it continues. Every value
carries a note naming its source; ``brainrecon decoders describe neuropictor`` prints them.
"""

from __future__ import annotations

from brainrecon.recipes import Recipe

_REPO = "jingyanghuo/neuropictor @5e1584a"
_PAPER = "Huo et al., NeuroPictor, ECCV 2024 (arXiv 2403.18211), §4.1"

_RELEASED_VALUES = {
    # architecture (the defaults; stated so that a recipe run records them)
    "surface_size": 256,
    "patch_size": 16,
    "encoder_dim": 1024,
    "encoder_depth": 24,
    "encoder_heads": 16,
    "encoder_eps": 1e-5,
    "semantic_hidden": None,
    "image_size": 512,
    # data
    "image_resize": "pil-bilinear",
    # optimisation
    "batch_size": 16,
    "global_batch": {"pretrain": 96, "pretrain_mask": 96, "finetune": 32, "finetune_mask": 32},
    "epochs": {"pretrain": 80, "pretrain_mask": 20, "finetune": 160, "finetune_mask": 15},
    "lr": {"pretrain": 1e-4, "pretrain_mask": 1e-5, "finetune": 1e-4, "finetune_mask": 1e-5},
    "weight_decay": 0.01,
    "lr_schedule": "constant",
    "lr_warmup_steps": 0,
    "grad_clip": None,
    "mixed_precision": "auto",
    # losses and conditioning
    "semantic_weight": {"pretrain": 0.0, "pretrain_mask": 0.0, "finetune": 0.1, "finetune_mask": 0.1},
    "sem_target": "last",
    "cfg_drop": 0.05,
    "detach_unet_encoder": {"pretrain": True, "pretrain_mask": False, "finetune": False,
                            "finetune_mask": False},
    # sampling
    "sample_precision": "fp16-autocast",
    "pixel_rounding": "truncate",
    "guidance_scale": 5.0,
    "num_inference_steps": 50,
    "control_scale": 1.0,
    "predict_batch_size": 4,
}

_RELEASED_NOTES = {
    "surface_size": "1 x 256 x 256 surface crop (dataset/dataset.py; PatchEmbed2D asserts the size)",
    "patch_size": "fMRI_AutoEncoder.yaml Data.patch_size; paper supplement: patch 16",
    "encoder_dim": "paper supplement: dim 1024 (also read from checkpoint_120000.pth by encoder_init)",
    "encoder_depth": "paper supplement: depth 24 (also read from checkpoint_120000.pth by encoder_init)",
    "encoder_heads": "paper supplement: 16 heads (fMRI_AutoEncoder.yaml Model.num_heads)",
    "encoder_eps": "fmrienc_src/transformer_layers.py: nn.LayerNorm(dim), torch default eps 1e-5",
    "semantic_hidden": "None = tokens // 2: cldm_fmri_surf.py FMRIToSemanticModel (128 at 257 tokens)",
    "image_size": "transforms.Resize((512, 512)) in dataset/dataset.py; SD 2.1-base at 512 px",
    "image_resize": "dataset/dataset.py: torchvision transforms.Resize on a PIL image = PIL bilinear",
    "batch_size": "batch_size 16 per GPU in models/{pretrain,pretrain_mask,finetune,finetune_mask}.yaml",
    "global_batch": "pretrain*.yaml: 6 GPUs x 16 = 96; finetune*.yaml: 2 GPUs x 16 = 32 (accum_grad 1); "
                    "here by gradient accumulation on any number of GPUs",
    "epochs": "released files: pretrain_multi_sub/sub_all_womask/epoch_080.pth (80 of max_epochs 100), "
              "finetune_single_sub/sub0X/epoch_015.pth (mask stage 15 of 20); finetune.yaml max_epochs 160 "
              "(subject 1; 180-200 for subjects 2/5/7, pass epochs yourself); pretrain_mask.yaml 20",
    "lr": "learning_rate in models/*.yaml: 1e-4, mask stages 1e-5",
    "weight_decay": "configure_optimizers (cldm_fmri_surf.py, cldm_fmri_pret.py): AdamW weight_decay 0.01",
    "lr_schedule": "configure_optimizers returns the optimiser alone: no scheduler, no warm-up",
    "lr_warmup_steps": "no warm-up (configure_optimizers)",
    "grad_clip": "train.py: pl.Trainer without gradient_clip_val (no clipping)",
    "mixed_precision": "precision bf16 in models/*.yaml; 'auto' = bf16 on CUDA (CPU: fp32)",
    "semantic_weight": "sem_loss_weight: 0.0 in pretrain*.yaml, 0.1 in finetune*.yaml",
    "sem_target": "cldm_fmri_surf.py: encode_text_final, last layer + ln_final of the OpenCLIP ViT-H-14 "
                  "text tower (needs sem_text_model)",
    "cfg_drop": "mask_rate 0.05 (mask_flag True in pretrain_mask.yaml and finetune_mask.yaml)",
    "detach_unet_encoder": "from_scrach True in pretrain.yaml (frozen UNet encoder under no_grad), False in "
                           "pretrain_mask.yaml; cldm_fmri_surf.py removes the no_grad",
    "sample_precision": "reconstruction.py --precision autocast (fp16 autocast over fp32 weights)",
    "pixel_rounding": "reconstruction.py writes Image.fromarray((255. * x).astype(np.uint8)): truncation",
    "guidance_scale": "reconstruction.py --scale 5.0; inference.yaml",
    "num_inference_steps": "reconstruction.py --ddim_steps 50 (eta 0)",
    "control_scale": "control_scales = [1.0] * 13 (cldm_fmri_surf.py)",
    "predict_batch_size": "reconstruction.py --batch_size 4; inference.yaml batch 4",
}

_PAPER_VALUES = {
    "global_batch": {"pretrain": 64, "pretrain_mask": 96, "finetune": 32, "finetune_mask": 32},
    "steps": {"pretrain": 100_000, "finetune": 60_000},
}

_PAPER_NOTES = {
    "global_batch": "paper: multi-subject pre-training on 4 A6000 with batch 64, fine-tuning on 2 A6000 with "
                    "batch 32; mask stages not described (the released code's 96 / 32)",
    "steps": "paper: 100k iterations of multi-subject pre-training, 60k of single-subject fine-tuning; mask "
             "stages not described (the released epochs apply)",
}

RELEASED = Recipe(
    name="neuropictor-released",
    decoder="neuropictor",
    source=f"{_REPO}: models/*.yaml, train.py, cldm/*.py, reconstruction.py, dataset/dataset.py, README",
    summary="the official code's settings per stage and the epochs of the released models",
    values=_RELEASED_VALUES,
    notes=_RELEASED_NOTES,
)

PAPER = Recipe(
    name="neuropictor-paper",
    decoder="neuropictor",
    source=f"{_PAPER}; elsewhere as neuropictor-released ({_REPO})",
    summary="the paper's batch sizes and iteration counts, otherwise the released settings",
    values={**_RELEASED_VALUES, **_PAPER_VALUES},
    notes={**_RELEASED_NOTES, **_PAPER_NOTES},
)

RECIPES = (RELEASED, PAPER)

__all__ = ["PAPER", "RECIPES", "RELEASED"]
