"""The registered ``ridge`` decoder: one subject's z-scored voxels to a target space (pixels,
IP-Adapter tokens) through :class:`~brainrecon.decoders.ridge.estimator.RidgeCV`, with optional
rescaling of predictions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from brainrecon.decoders.base import CONFIG_FILE, CliOption, Decoder
from brainrecon.decoders.ridge.backends import _full_precision_matmul, get_ridge_backend
from brainrecon.decoders.ridge.estimator import RidgeCV, default_alphas
from brainrecon.decoders.ridge.solvers import _check_alphas
from brainrecon.errors import DataError
from brainrecon.io import check_arrays, load_npz

RESCALES = ("none", "train", "test")
TRIALS = ("average", "single")
_WEIGHTS_FILE = "ridge_weights.npz"


class RidgeDecoder(Decoder):
    """Ridge regression from one subject's z-scored voxels to a target space.

    Voxels are z-scored with training statistics (ddof 1; constant voxels get scale 1),
    targets are flattened to ``(n, -1)``, and :class:`RidgeCV` chooses alpha per target
    (or per token, or globally) by exact leave-one-out, fitting an unpenalised intercept.

    Parameters
    ----------
    subject : int, optional
        Subject to fit; None: the training split's first subject.
    target : str, default "pixels"
        Target space (:func:`brainrecon.targets.get_target`): "pixels" or "ipadapter".
    target_options : dict, optional
        Keyword options of the target space, e.g. ``{"size": 32}`` for pixels.
    alphas : sequence of float, optional
        Alpha grid; None: ``n_voxels * 10 ** linspace(-2, 2, 9)`` (:func:`default_alphas`).
    cv : {"loo", "gcv"}, default "loo"
        Exact leave-one-out, or the generalised cross-validation approximation.
    granularity : {"target", "token", "global"}, default "target"
        One alpha per target dimension, per token (per index of the target's first
        axis: 16 IP-Adapter tokens of 768 dimensions; rows of a pixel image), or one alpha.
    rescale : {"train", "none", "test"}, default "train"
        Recalibration of each predicted dimension, which undoes ridge shrinkage (IP-Adapter
        conditioning strength depends on the scale of the tokens):

        * ``"train"``: an affine map per dimension that gives the training set's exact
          leave-one-out predictions the mean and standard deviation of the training
          targets. Uses training data only, so a test image's prediction does not depend
          on the other test images. The default for that reason.
        * ``"test"``: Brain-Diffuser's recalibration, z-scoring each dimension over the
          test predictions and mapping to the training targets' mean and standard
          deviation (transductive: needs the whole test batch; Brain-Diffuser's ``vdvae_regression.py``).
        * ``"none"``: raw ridge predictions.
    device : {"auto", "cpu", "cuda", "numpy"}, default "auto"
        Where the solver runs (:func:`get_ridge_backend`).
    dtype : {"float32", "float64"}, default "float32"
        Solver precision.
    nan_policy : {"error", "zero"}, default "error"
        Non-finite voxel values: raise, or replace by 0.
    trials : {"average", "single"}, default "average"
        Fit on each image's averaged voxels (Brain-Diffuser) or on every single trial paired with
        its image's target (trial-wise training as in Takagi & Nishimoto and MindEye2); the test
        images are predicted from their averages either way, and the z-scoring statistics come from
        what was fitted. With single trials the leave-one-out that chooses alpha leaves one *trial*
        out: the image's other trials stay in, which favours smaller alphas than leaving the image
        out would. Needs data with single trials.

    Attributes
    ----------
    subjects_ : list of int
        The one fitted subject.
    n_voxels_ : dict
        Subject -> voxel count.
    alphas_ : ndarray of shape (n_target_dims,)
        Chosen alpha per flattened target dimension.
    target_shape_ : tuple of int
        Shape of one prediction.
    """

    name = "ridge"
    predicts = "target"
    summary = (
        "Closed-form ridge from z-scored voxels to a target space; alpha per target by "
        "exact leave-one-out (CPU or CUDA)."
    )
    citation = ("Ridge regression to IP-Adapter Plus image tokens or pixels, fitted with himalaya "
                "(Dupré la Tour et al., NeuroImage 2022); the NSD recipe follows Brain-Diffuser "
                "(Ozcelik & VanRullen, Scientific Reports 2023).")
    main_params = ("target", "alphas", "granularity", "rescale", "device")
    cli_options = (CliOption("alphas", "--alphas", "floats", "comma-separated alpha grid, e.g. 1e3,1e4,1e5"),)

    def __init__(
        self,
        *,
        subject=None,
        target="pixels",
        target_options=None,
        alphas=None,
        cv="loo",
        granularity="target",
        rescale="train",
        device="auto",
        dtype="float32",
        nan_policy="error",
        trials="average",
    ):
        self.subject = subject
        self.target = target
        self.target_options = target_options
        self.alphas = alphas
        self.cv = cv
        self.granularity = granularity
        self.rescale = rescale
        self.device = device
        self.dtype = dtype
        self.nan_policy = nan_policy
        self.trials = trials

    # ------------------------------------------------------------------ fit / predict
    def _check_rescale(self) -> None:
        if self.rescale not in RESCALES:
            raise DataError(
                f"Unknown rescale {self.rescale!r}. Valid choices: "
                f"{', '.join(map(repr, RESCALES))}."
            )

    def fit(self, train) -> "RidgeDecoder":
        """Fit on one subject of a training split.

        Parameters
        ----------
        train : brainrecon.data.Split

        Returns
        -------
        self
        """
        from brainrecon.targets import get_target

        self._check_rescale()
        subject = train.subjects[0] if self.subject is None else int(self.subject)
        if subject not in train.subjects:
            raise DataError(
                f"Subject {subject} is not in the training data; available subjects: "
                f"{train.subjects}."
            )
        if self.trials not in TRIALS:
            raise DataError(f"Unknown trials {self.trials!r}. Valid choices: {', '.join(map(repr, TRIALS))}.")
        target = get_target(self.target, **(self.target_options or {}))
        Y = np.asarray(target.load(train, subject), dtype=np.float32)
        if self.trials == "single":
            X, rows = train.trial_voxels(subject, nan_policy=self.nan_policy)
            Y = Y[rows]
        else:
            X = train.voxels(subject, nan_policy=self.nan_policy)
        if Y.shape[0] != X.shape[0]:
            raise DataError(
                f"Subject {subject}: {X.shape[0]} voxel rows but {Y.shape[0]} targets."
            )
        target_shape = tuple(int(d) for d in Y.shape[1:])
        Y = Y.reshape(Y.shape[0], -1)

        x_mean, x_scale = _column_mean_std(X, ddof=1)
        # Constant voxels carry no information; scale 1 keeps them at exactly 0.
        x_scale[~(x_scale > 0)] = 1.0
        Xz = X - x_mean.astype(np.float32)  # float32 throughout: no float64 copy of X
        Xz /= x_scale.astype(np.float32)
        del X

        model = RidgeCV(
            alphas=self.alphas,
            fit_intercept=True,
            device=self.device,
            dtype=self.dtype,
            cv=self.cv,
            granularity=self.granularity,
            target_groups=target_shape[0] if self.granularity == "token" else None,
            loo_prediction_stats=self.rescale == "train",
            progress=None,
        ).fit(Xz, Y)

        self.subjects_ = [subject]
        self.n_voxels_ = {subject: int(Xz.shape[1])}
        self.target_shape_ = target_shape
        self.coef_ = model.coef_.astype(np.float32, copy=False)
        self.intercept_ = np.asarray(model.intercept_, dtype=np.float32)
        self.x_mean_ = x_mean.astype(np.float32)
        self.x_scale_ = x_scale.astype(np.float32)
        self.alphas_ = model.alphas_
        self.alpha_grid_ = model.alpha_grid_
        self.cv_scores_ = model.cv_scores_
        y_mean, y_std = _column_mean_std(Y, ddof=0)
        self.y_mean_ = y_mean.astype(np.float32)
        self.y_std_ = y_std.astype(np.float32)
        if self.rescale == "train":
            self.scale_, self.shift_ = _affine_to(
                model.loo_mean_, model.loo_std_, self.y_mean_, self.y_std_
            )
        return self

    def predict(self, test) -> dict[int, np.ndarray]:
        """Predict targets for the fitted subject.

        Parameters
        ----------
        test : brainrecon.data.Split

        Returns
        -------
        dict
            ``subject -> float32 array of shape (n, *target_shape_)``, aligned with
            ``test.ids(subject)``.
        """
        self._check_rescale()
        out = {}
        for subject in self._predict_subjects(test):
            X = test.voxels(subject, nan_policy=self.nan_policy)
            self._check_voxels(X, subject)
            Xz = (X - self.x_mean_) / self.x_scale_
            pred = self._linear(Xz.astype(np.float32, copy=False))
            if self.rescale == "train":
                pred = pred * self.scale_ + self.shift_
            elif self.rescale == "test":
                scale, shift = _affine_to(
                    pred.mean(axis=0, dtype=np.float64),
                    pred.std(axis=0, dtype=np.float64),
                    self.y_mean_,
                    self.y_std_,
                )
                pred = pred * scale + shift
            out[subject] = pred.astype(np.float32, copy=False).reshape((-1,) + self.target_shape_)
        return out

    def _linear(self, Xz: np.ndarray) -> np.ndarray:
        backend = get_ridge_backend(self.device)
        with _full_precision_matmul(backend):
            out = backend.matmul(
                backend.asarray(Xz, dtype=self.dtype), backend.asarray(self.coef_, dtype=self.dtype)
            )
            out = np.asarray(backend.to_numpy(out), dtype=np.float32)
        return out + self.intercept_

    # ------------------------------------------------------------------ persistence
    def _save_weights(self, directory: Path) -> dict[str, Any]:
        from brainrecon.io import write_npz_atomic

        arrays = {
            "coef": self.coef_,
            "intercept": self.intercept_,
            "x_mean": self.x_mean_,
            "x_scale": self.x_scale_,
            "alphas": self.alphas_,
            "alpha_grid": self.alpha_grid_,
            "cv_scores": self.cv_scores_.astype(np.float32),
            "y_mean": self.y_mean_,
            "y_std": self.y_std_,
        }
        if hasattr(self, "scale_"):
            arrays["scale"] = self.scale_
            arrays["shift"] = self.shift_
        write_npz_atomic(Path(directory) / _WEIGHTS_FILE, **arrays)
        return {"weights": _WEIGHTS_FILE, "target_shape": list(self.target_shape_)}

    def _load_weights(self, directory: Path, state: dict[str, Any]) -> None:
        path = Path(directory) / state.get("weights", _WEIGHTS_FILE)
        if not path.is_file():
            raise DataError(f"{path} is missing: the saved ridge decoder is incomplete; refit it.")
        fix = "the saved ridge decoder is damaged: refit it"
        arrays = load_npz(path, fix=fix)
        self.target_shape_ = tuple(int(d) for d in state["target_shape"])
        n_vox = int(next(iter(self.n_voxels_.values())))
        n_out = int(np.prod(self.target_shape_))
        n_alphas = self._saved_grid_size(Path(directory), n_vox)
        # Every array against what brainrecon.json implies, in the dtypes _save_weights writes:
        # a grid or a score table cut short is as damaged as a cut coefficient matrix.
        check_arrays(path, arrays, {
            "coef": ((n_vox, n_out), "float32"), "intercept": ((n_out,), "float32"),
            "x_mean": ((n_vox,), "float32"), "x_scale": ((n_vox,), "float32"),
            "alphas": ((n_out,), "float64"), "alpha_grid": ((n_alphas,), "float64"),
            "cv_scores": ((n_alphas, n_out), "float32"),
            "y_mean": ((n_out,), "float32"), "y_std": ((n_out,), "float32"),
            "scale": ((n_out,), "float32"), "shift": ((n_out,), "float32"),
        }, optional=("scale", "shift"),
            fix=f"{fix} (brainrecon.json says {n_vox} voxels, {n_out} target values and {n_alphas} alphas)")
        if ("scale" in arrays) != ("shift" in arrays):
            raise DataError(f"{path} holds only one of 'scale' and 'shift'; {fix}.")
        self.coef_ = arrays["coef"]
        self.intercept_ = arrays["intercept"]
        self.x_mean_ = arrays["x_mean"]
        self.x_scale_ = arrays["x_scale"]
        self.alphas_ = arrays["alphas"]
        self.alpha_grid_ = arrays["alpha_grid"]
        self.cv_scores_ = arrays["cv_scores"].astype(np.float64)
        self.y_mean_ = arrays["y_mean"]
        self.y_std_ = arrays["y_std"]
        if "scale" in arrays:
            self.scale_ = arrays["scale"]
            self.shift_ = arrays["shift"]
        if self.rescale == "train" and not hasattr(self, "scale_"):
            raise DataError(
                f"{path} holds no rescaling statistics but rescale='train'; refit the decoder."
            )


    def _saved_grid_size(self, directory: Path, n_voxels: int) -> int:
        """Length of the alpha grid the saved parameters imply (``alphas``, or the default grid)."""
        if self.alphas is None:
            return int(default_alphas(n_voxels).shape[0])
        try:
            return int(_check_alphas(self.alphas).shape[0])
        except (DataError, TypeError, ValueError) as exc:
            raise DataError(f"{directory / CONFIG_FILE}: parameter 'alphas': {exc}") from None


def _column_mean_std(
    X: np.ndarray, ddof: int = 0, rows: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and standard deviation, accumulated in float64 over row blocks.

    Same values as ``X.mean(0)`` / ``X.std(0, ddof=ddof)`` in float64, without a float64
    copy of the whole of X (1.1 GB at NSD scale).
    """
    n = X.shape[0]
    mean = X.sum(axis=0, dtype=np.float64) / n
    sq = np.zeros_like(mean)
    for start in range(0, n, rows):
        block = X[start : start + rows] - mean
        sq += np.einsum("ij,ij->j", block, block)
    return mean, np.sqrt(sq / max(n - ddof, 1))


def _affine_to(mean, std, target_mean, target_std) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension ``scale, shift`` mapping (mean, std) to (target_mean, target_std).

    Dimensions whose predictions do not vary (std 0, e.g. a constant target) are left
    unchanged rather than divided by zero.
    """
    mean = np.asarray(mean, dtype=np.float64)
    std = np.asarray(std, dtype=np.float64)
    ok = std > 1e-12 * (np.abs(mean) + 1.0)
    scale = np.where(ok, np.asarray(target_std, np.float64) / np.where(ok, std, 1.0), 1.0)
    shift = np.where(ok, np.asarray(target_mean, np.float64) - scale * mean, 0.0)
    return scale.astype(np.float32), shift.astype(np.float32)
