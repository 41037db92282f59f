"""BrainGuard's named recipes: the released code's settings, the WeADL 16×768 adaptation, the paper's
two-branch network.

Each value carries a note naming the file (or paper) it comes from; ``brainrecon decoders
describe brainguard`` prints them. ``brainguard-released`` and ``weadl`` are meant for ``--target
ipadapter`` (they do not set the target: ``fit --target`` does); ``brainguard-paper`` is the
published two-branch network and sets ``target="clip"`` (an explicit ``--target`` still wins).

Where the released code's behaviour is a bug that cannot be reproduced meaningfully (the
argument shift into the fusion learner, the never-set ``flag_dfl`` that disables all
synchronisation as released), the recipes follow what the code evidently intends, as the
WeADL fork fixed it; the accidental-but-harmless behaviours (inverted EMA, decayed LayerNorm
weights) are reproduced.
"""

from __future__ import annotations

from brainrecon.recipes import Recipe

_OFFICIAL = "kunzhan/BrainGuard @8d2b28e"
_FORK = "IoanaGabor/bachelor-thesis @449f347f experiments/efficient-vbd/brainguard-ipadapter"

_SHARED_VALUES = {
    "hidden": 2048,
    "n_blocks": 4,
    "dropout": 0.15,
    "rounds": 600,
    "local_iterations": 1,
    "batch_size": 50,
    "lr": 3e-4,
    "weight_decay": 1e-2,
    "decay_layernorm": True,
    "mse_weight": 2e4,
    "softclip_tau": 0.05,
    "softclip_weight": 1.0,
    "dfl_eta": 1.0,
    "dfl_grad_scale": 1000.0,
    "dfl_threshold": 50.0,
    "dfl_num_pre_loss": 10,
    "ema": "inverted",
    "ema_decay": 0.999,
    "warmup_epochs": 2.0,
    "validation": "dataset",
    "validation_fraction": 0.0,
    "trials": "single",
    "calibration": "none",
}


def _shared_notes(src: str) -> dict[str, str]:
    return {
        "hidden": f"{src} trainmodel/models.py: BrainNetwork h=2048, ridge out_features=2048.",
        "n_blocks": f"{src} trainmodel/models.py: n_blocks=4 residual MLP blocks.",
        "dropout": f"{src} trainmodel/models.py: drop2=0.15 inside the blocks.",
        "rounds": f"{src} scripts/train.sh: -gr 600 global rounds.",
        "local_iterations": f"{src} scripts/train.sh: -ls 1 (one local epoch per round).",
        "batch_size": f"{src} scripts/train.sh: -lbs 50.",
        "lr": f"{src} main.py / clients/client.py: local_learning_rate 3e-4, AdamW betas (0.9, 0.9999), OneCycle.",
        "weight_decay": f"{src} clients/client.py set_opt_grouped_parameters: weight_decay 1e-2.",
        "decay_layernorm": (f"{src} clients/client.py: the no-decay list ('bias', 'LayerNorm.bias', "
                            f"'LayerNorm.weight') never matches index-named LayerNorm modules, so LayerNorm "
                            f"weights are decayed; biases are not."),
        "mse_weight": f"{src} clients/client.py: loss_mse * 10000, counted twice (loss_mse_image * 2).",
        "softclip_tau": f"{src} utils/utils.py soft_clip_loss: temp=0.05.",
        "softclip_weight": f"{src} clients/client.py: + loss_clip_image with weight 1.",
        "dfl_eta": f"{src} main.py: eta 1.0 for the Dynamic Fusion Learner.",
        "dfl_grad_scale": f"{src} utils/DFL.py: gradient multiplied by 1000 in the W update.",
        "dfl_threshold": f"{src} utils/DFL.py: std of the last losses < 50 ends the start phase "
                         f"(never met at these loss scales: the start phase runs num_pre_loss + 1 epochs).",
        "dfl_num_pre_loss": f"{src} utils/DFL.py: num_pre_loss=10.",
        "ema": (f"{src} clients/client.py update_local_ema: ema <- 0.999 * param + 0.001 * ema before "
                f"each step (inverted decay); the server averages model_ema."),
        "ema_decay": f"{src} main.py: ema_decay 0.999.",
        "warmup_epochs": f"{src} clients/client.py set_lr_scheduler: pct_start = 2 / (global_rounds * local_steps).",
        "validation": (f"{src} clients/client.py + utils/data.py get_dls: best-by-validation model per client "
                       f"(client*_best.pth on a higher mean validation cosine similarity, voxels averaged over the "
                       f"3 repetitions) on MindEye1's webdataset_avg_split/val split: the dataset's named validation "
                       f"split (the val shards with MindEye1 data; the data's seeded hold-out with other sources)."),
        "validation_fraction": "Unused: validation='dataset' takes the data's validation split.",
        "trials": (f"{src} clients/client.py: voxel = voxel[:, train_i % 3] - one repetition per sample, the same "
                   f"index for the whole batch, chosen by the batch's index in the epoch; utils/DFL.py and "
                   f"validation use the mean of the 3. brainrecon trains on each distinct image once per epoch; "
                   f"the released get_dls(length=8859) takes the first 8,859 sample keys of the train folder, "
                   f"duplicates included (fMRI-reconstruction-NSD #55)."),
    }


BRAINGUARD_RELEASED = Recipe(
    name="brainguard-released",
    decoder="brainguard",
    source=(f"{_OFFICIAL} (scripts/train.sh, main.py, clients/client.py, utils/DFL.py, trainmodel/models.py); "
            f"Tian et al., BrainGuard, AAAI 2025 (arXiv 2501.14309)"),
    summary="The official BrainGuard code's training settings, on a single image-token branch.",
    values={**_SHARED_VALUES, "sync_layers": 1, "sync_tensors": None},
    notes={
        **_shared_notes(_OFFICIAL),
        "sync_layers": (f"{_OFFICIAL} scripts/train.sh: -p 24 tensors adaptively fused; on the released "
                        f"two-branch network those are its two projectors (tensors 22-45), so on this "
                        f"single-branch network the equivalent is the projector alone (the last layer unit)."),
        "sync_tensors": "Unset: the projector tier is given as a layer unit (sync_layers=1).",
        "calibration": (f"{_OFFICIAL}: no output calibration exists in the released code; its predicted "
                        f"CLIP tokens go to the generator as they are."),
    },
)

WEADL = Recipe(
    name="weadl",
    decoder="brainguard",
    source=(f"{_FORK} (main.py, scripts/train.sh, clients/client.py, reconstruction.py; files headed "
            f"'adaptation of kunzhan/BrainGuard'); WeADL 2025"),
    summary=("The WeADL 16x768 IP-Adapter Plus adaptation (use with --target ipadapter; the fork's "
             "scripts/train.sh federates subjects 1, 2, 5)."),
    values={**_SHARED_VALUES, "sync_layers": 0, "sync_tensors": 24},
    notes={
        **_shared_notes(_FORK),
        "sync_layers": "Unused: sync_tensors overrides it.",
        "sync_tensors": (f"{_FORK} scripts/train.sh: -p 24 of the 32 tensors, i.e. tensors 8-31 (block 1's "
                         f"LayerNorm, blocks 2-3, head, projector) fused adaptively; tensors 2-7 overwritten."),
        "calibration": (f"{_FORK} reconstruction.py: the raw predicted tokens go to SD 1.5 + IP-Adapter Plus "
                        f"(prompt_embeds=torch.stack([results[0][0:16]])), no rescaling."),
        "hidden": (f"{_FORK} trainmodel/models.py: h=2048 as published (the deployed ai-server model uses "
                   f"h=1024)."),
    },
)

BRAINGUARD_PAPER = Recipe(
    name="brainguard-paper",
    decoder="brainguard",
    source=(f"{_OFFICIAL} (main.py, trainmodel/models.py, clients/client.py, scripts/train.sh); "
            f"Tian et al., BrainGuard, AAAI 2025 (arXiv 2501.14309)"),
    summary=("The published two-branch BrainGuard: CLIP ViT-L/14 image (257x768) and caption (77x768) states, "
             "h = 2048, both losses; sets --target clip."),
    values={**_SHARED_VALUES, "target": "clip", "branches": [257, 77], "projector_hidden": 2048,
            "sync_layers": 1, "sync_tensors": None},
    notes={
        **_shared_notes(_OFFICIAL),
        "target": (f"{_OFFICIAL} clients/client.py: targets clip_extractor.embed_image / embed_text "
                   f"(Clipper('ViT-L/14', hidden_state=True, norm_embs=True)): the clip target space."),
        "branches": (f"{_OFFICIAL} main.py: BrainNetwork(out_dim_image=257*768, out_dim_text=77*768): separate "
                     f"head_image/head_text and projector_image/projector_text; loss = 2*MSE_img + SoftCLIP_img "
                     f"+ SoftCLIP_txt + 2*MSE_txt (clients/client.py)."),
        "projector_hidden": f"{_OFFICIAL} trainmodel/models.py: the projectors' Linear(768, 2048) is fixed at 2048.",
        "sync_layers": (f"{_OFFICIAL} scripts/train.sh: -p 24 tensors, on the two-branch network exactly both "
                        f"projectors (tensors 22-45), the last layer unit here."),
        "sync_tensors": "Unset: sync_layers=1 selects the same 24 tensors.",
        "calibration": (f"{_OFFICIAL}: no output calibration; the predicted states are re-normalised by the "
                        f"token-0 norm at generation (utils/utils.py reconstruction(), as MindBridge)."),
    },
)

RECIPES = (BRAINGUARD_RELEASED, WEADL, BRAINGUARD_PAPER)

__all__ = ["BRAINGUARD_PAPER", "BRAINGUARD_RELEASED", "RECIPES", "WEADL"]
