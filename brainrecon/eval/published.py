"""Published NSD reconstruction scores, as reference rows for the leaderboard.

Every row is copied from the project's specification files (which cite the paper or
notebook it came from); the citation travels with the row. These numbers mix test
sets (982 vs 1000 images), preprocessing variants and library versions
so they are context for NSD runs, never a ranking target,
and they are never shown beside runs on synthetic data.

Two-way identification and retrieval scores are stored as fractions (papers print
percentages). The retrieval rows (MindEye1, MindEye2) were measured between each model's own
brain embeddings and CLIP image embeddings, not between reconstructions and ground truth:
comparable to brainrecon's ``ImageRet(CLIP)`` / ``BrainRet(CLIP)`` only in kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from brainrecon.eval.names import CLIP_RETRIEVAL_METRICS, METRICS, TWO_WAY_METRICS

__all__ = ["PUBLISHED", "PublishedRow", "published_rows"]

_COLUMNS = METRICS
_TWO_WAY = set(TWO_WAY_METRICS)
_RETRIEVAL = CLIP_RETRIEVAL_METRICS


@dataclass(frozen=True)
class PublishedRow:
    """One published result.

    Attributes
    ----------
    method : str
    scores : dict of str to float
        Metric -> value (two-way as a fraction); metrics the source does not report
        are absent.
    subjects : str
        ``"avg 1,2,5,7"`` or ``"1"`` etc.
    n_images : int or None
        Test-set size when the source states it.
    citation : str
        Paper / repository and the spec section the numbers were taken from.
    kind : {"main", "ablation", "retrieval"}
    """

    method: str
    scores: dict[str, float]
    subjects: str
    n_images: int | None
    citation: str
    kind: str = "main"
    notes: str = field(default="")


def _row(method, values, subjects, n_images, citation, kind="main", notes=""):
    """``values``: the 8 columns as printed (two-way in %), None for "–"."""
    scores = {}
    for col, v in zip(_COLUMNS, values):
        if v is None:
            continue
        scores[col] = round(v / 100.0, 6) if col in _TWO_WAY else v
    return PublishedRow(method, scores, subjects, n_images, citation, kind, notes)


def _retrieval_row(method, image_ret, brain_ret, subjects, n_images, citation):
    """Retrieval figures as printed (fractions), by what the code computes (see ``_ME_RET_NOTE``)."""
    return PublishedRow(method, dict(zip(_RETRIEVAL, (image_ret, brain_ret))), subjects, n_images, citation,
                        "retrieval", _ME_RET_NOTE)


_ME1 = ("MindEye (Scotti et al., NeurIPS 2023) notebook output, MedARC-AI/fMRI-reconstruction-NSD @6b30ea53 "
        "src/Reconstruction_Metrics.ipynb")
_ME2 = ("MindEye2 (Scotti et al., ICML 2024) notebook output, MedARC-AI/MindEyeV2 @c1847188 "
        "src/final_evaluations.ipynb")
_NP1 = "NeuroPictor (Huo et al., ECCV 2024), Table 1 (average of subjects 1, 2, 5, 7)"
_NP2 = "NeuroPictor (Huo et al., ECCV 2024), Table 2 (ablations, subject 1)"
_WEADL = ("WeADL 2025 (IoanaGabor/bachelor-thesis, ridge and BrainGuard adaptation to IP-Adapter Plus tokens); "
          "average of subjects 1, 2, 5, 7")
_WEADL_SUBJ = "WeADL 2025, ridge per subject (IoanaGabor/bachelor-thesis)"
# Retrieval: 300-way top-1, mean over 30 random sets of 300 test images. The code names the
# figures fwd/bwd; its utils.batchwise_cosine_similarity(Z, B) returns the *transposed* matrix
# (rows: B), so the row-wise top-1 of fwd_sim = f(brain, image) asks, per image, whether its own
# brain embedding is the most similar (BrainRet), and bwd per brain embedding (ImageRet) —
# checked by running the helper on constructed data (tests/test_retrieval.py).
_ME_RET_NOTE = (
    "retrieval between the model's own brain embeddings (its retrieval head) and CLIP image embeddings, "
    "not between reconstructions and ground truth: comparable to ImageRet(CLIP)/BrainRet(CLIP) only in kind; "
    "the code's fwd is BrainRet and its bwd ImageRet (its similarity helper returns the transposed matrix)"
)
_ME1_RET = ("MindEye (Scotti et al., NeurIPS 2023), retrieval printed in MedARC-AI/fMRI-reconstruction-NSD "
            "@6b30ea53 src/Retrievals.py (fwd/bwd percent_correct, 982 test images, 30 webdataset batches of 300; "
            "CLIP ViT-L/14 last hidden states, 257x768, vs the voxel2clip output). " + _ME_RET_NOTE)
_ME2_RET = ("MindEye2 (Scotti et al., ICML 2024), retrieval cell output of MedARC-AI/MindEyeV2 @c1847188 "
            "src/final_evaluations.ipynb (1000 test images, 30 x np.random.choice(1000, 300), seed 42; OpenCLIP "
            "ViT-bigG/14 image tokens, 256x1664, vs the retrieval submodule's output). " + _ME_RET_NOTE)

PUBLISHED: tuple[PublishedRow, ...] = (
    # metrics.md §6.1 — scores stored in the reference notebooks (subject 1).
    _row("MindEye (notebook, 16 samples)", (.3925, .3467, 97.38, 98.65, 94.53, 94.34, .6345, .3578), "1", 982, _ME1),
    _row("MindEye2 (notebook, enhanced + blend)", (.3740, .4395, 97.91, 99.11, 96.00, 93.69, .6075, .3363),
         "1", 1000, _ME2),
    # Retrieval (ImageRet = the code's bwd, BrainRet = its fwd), MindEye1 per subject, MindEye2 subject 1.
    _retrieval_row("MindEye (retrieval)", .9468, .9718, "1", 982, _ME1_RET),
    _retrieval_row("MindEye (retrieval)", .9386, .9710, "2", 982, _ME1_RET),
    _retrieval_row("MindEye (retrieval)", .8573, .9067, "5", 982, _ME1_RET),
    _retrieval_row("MindEye (retrieval)", .8582, .8941, "7", 982, _ME1_RET),
    _retrieval_row("MindEye2 (retrieval)", .9987, .9996, "1", 1000, _ME2_RET),
    # metrics.md §6.2 / neuropictor.md §11.1 — NeuroPictor Table 1, average of subjects 1, 2, 5, 7.
    _row("NeuroPictor", (.229, .375, 96.5, 98.4, 94.5, 93.3, .639, .350), "avg 1,2,5,7", 982, _NP1),
    _row("NeuroPictor (Pretrain)", (.140, .366, 89.5, 94.6, 88.5, 89.5, .718, .418), "avg 1,2,5,7", 982, _NP1),
    _row("MindEye (as reported by NeuroPictor)", (.309, .323, 94.7, 97.8, 93.8, 94.1, .645, .367),
         "avg 1,2,5,7", None, _NP1),
    _row("Brain-Diffuser (as reported by NeuroPictor)", (.254, .356, 94.2, 96.2, 87.2, 91.5, .775, .423),
         "avg 1,2,5,7", None, _NP1),
    _row("Brain-Cap (as reported by NeuroPictor)", (.353, .327, 89.0, 97.0, 84.0, 90.0, None, None),
         "avg 1,2,5,7", None, _NP1),
    _row("Takagi et al. (as reported by NeuroPictor)", (None, None, 83.0, 83.0, 76.0, 77.0, None, None),
         "avg 1,2,5,7", None, _NP1),
    _row("Gu et al. (as reported by NeuroPictor)", (.150, .325, None, None, None, None, .862, .465),
         "avg 1,2,5,7", None, _NP1),
    # WeADL 2025, average of subjects 1, 2, 5, 7.
    _row("Ridge -> IP-Adapter Plus tokens", (.231, .322, 90.35, 96.3, 90.75, 87.8, .744, .422), "avg 1,2,5,7",
         None, _WEADL, notes="EffNet-B: the four per-subject rows average .762, not .744, as printed"),
    _row("BrainGuard adaptation -> IP-Adapter Plus tokens", (.241, .326, 93.92, 97.72, 95.10, 93.98, .619, .343),
         "avg 1,2,5,7", None, _WEADL),
    _row("BrainGuard (AAAI 2025)", (.313, .330, 94.7, 97.8, 96.1, 96.4, .624, .353), "avg 1,2,5,7", None, _WEADL),
    _row("MindEye2 (as reported by WeADL)", (.322, .431, 96.1, 98.6, 95.4, 93.0, .619, .333), "avg 1,2,5,7",
         None, _WEADL),
    _row("MindFormer", (.243, .345, 93.5, 97.6, 94.4, 94.4, .648, .350), "avg 1,2,5,7", None, _WEADL),
    _row("Psychometry", (.295, .328, 94.5, 96.8, 94.9, 95.3, .632, .361), "avg 1,2,5,7", None, _WEADL),
    _row("MindBridge", (.148, .259, 86.9, 95.3, 92.2, 94.3, .713, .413), "avg 1,2,5,7", None, _WEADL),
    _row("Mind-Vis", (.080, .220, 72.1, 83.2, 78.8, 76.2, .854, .491), "avg 1,2,5,7", None, _WEADL),
    # metrics.md §6.3 — ridge per subject.
    _row("Ridge -> IP-Adapter Plus tokens", (.244, .303, 93.3, 97.9, 92.9, 91.7, .733, .396), "1", None, _WEADL_SUBJ),
    _row("Ridge -> IP-Adapter Plus tokens", (.242, .331, 90.5, 96.4, 90.0, 86.1, .770, .427), "2", None, _WEADL_SUBJ),
    _row("Ridge -> IP-Adapter Plus tokens", (.221, .328, 89.7, 96.4, 91.2, 87.9, .757, .421), "5", None, _WEADL_SUBJ),
    _row("Ridge -> IP-Adapter Plus tokens", (.218, .327, 87.9, 94.5, 88.9, 85.5, .789, .444), "7", None, _WEADL_SUBJ),
    # neuropictor.md §11.2 — ablations, subject 1 (two-way columns printed without %).
    _row("NeuroPictor (full)", (.277, .385, 98.8, 99.3, 96.2, 94.5, .619, .334), "1", 982, _NP2),
    _row("NeuroPictor: random init", (.128, .323, 91.2, 95.1, 84.9, 86.0, .769, .448), "1", 982, _NP2, "ablation"),
    _row("NeuroPictor: [CLS]", (.139, .313, 90.8, 94.2, 87.9, 87.6, .736, .437), "1", 982, _NP2, "ablation"),
    _row("NeuroPictor: frozen", (.220, .342, 97.5, 98.8, 93.8, 92.8, .657, .360), "1", 982, _NP2, "ablation"),
    _row("NeuroPictor: full (w/o multi pret)", (.265, .368, 98.2, 99.1, 94.7, 93.4, .641, .342), "1", 982, _NP2,
         "ablation"),
    _row("NeuroPictor: W/o Finetune", (.163, .365, 92.9, 96.2, 89.9, 90.3, .703, .407), "1", 982, _NP2, "ablation"),
    _row("NeuroPictor: W/o LLMN", (.111, .307, 75.4, 88.4, 89.4, 89.9, .746, .460), "1", 982, _NP2, "ablation"),
    _row("NeuroPictor: W/o Au.Enc", (.221, .276, 91.1, 97.5, 94.5, 91.0, .668, .387), "1", 982, _NP2, "ablation"),
    _row("NeuroPictor: W/o L_sem", (.255, .373, 98.0, 98.9, 94.3, 93.0, .647, .350), "1", 982, _NP2, "ablation"),
)


def published_rows(subject: int | None = None, include_ablations: bool = False) -> list[PublishedRow]:
    """Published reference rows, optionally only those relevant to one subject.

    Parameters
    ----------
    subject : int, optional
        Keep rows for this subject and the subject-averaged rows.
    include_ablations : bool
        Also return NeuroPictor's ablation rows.

    Returns
    -------
    list of PublishedRow
    """
    rows = [r for r in PUBLISHED if include_ablations or r.kind != "ablation"]
    if subject is not None:
        rows = [r for r in rows if r.subjects.startswith("avg") or r.subjects == str(int(subject))]
    return rows
