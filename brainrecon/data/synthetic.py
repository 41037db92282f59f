"""The built-in synthetic dataset: NSD's shape in miniature, deterministic, no downloads.

Images are procedurally generated scenes (a two-colour gradient with a grating texture and
one to three coloured discs, squares or triangles), each drawn from its own seed, so image
``i`` is the same whichever subset is generated.

Responses come from one hidden encoding model shared by all subjects, defined on a 2-D
"cortical sheet" ``(u, v) in [0, 1]^2``:

- **retinotopy**: a unit at ``(u, v)`` pools the visual field around ``(u, v)``, with receptive
  fields growing away from the fovea at the sheet's centre;
- **tuning**: orientation preference varies smoothly along the sheet (a pinwheel-like map)
  and each unit mixes luminance orientation energy (a quadrature Gabor pair) with a colour
  opponent signal (red-green or blue-yellow, also a smooth map);
- **high level**: units in one band of the sheet (``u > 0.75``, a "ventral" strip) respond to
  which shapes are present and their colours, not to where they are.

Each subject samples voxels at its own positions on the sheet under a smooth subject-specific
warp; a voxel averages the units around it, then gets a subject-specific gain, baseline and a
little cross-talk from a random other voxel, and about a fifth of the voxels carry no signal.
Every image is "seen" three times with independent noise and the repetitions are averaged, as
in NSD preparation. Subjects 1, 2, 5, 7 each see their own training images and one shared test
set. The same voxels laid back onto the sheet and resampled to a fixed grid give the 2-D
"surface maps" that NeuroPictor takes as input.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
from scipy import sparse

from brainrecon.data.dataset import Dataset, SplitArrays
from brainrecon.errors import DataError

DEFAULT_SUBJECTS = (1, 2, 5, 7)
# Voxel counts keep NSD's ordering (subject 1 has the most nsdgeneral voxels), scaled down.
DEFAULT_VOXELS = {1: 1600, 2: 1450, 3: 1550, 4: 1340, 5: 1330, 6: 1800, 7: 1290, 8: 1460}

_SHAPES = ("disc", "square", "triangle")
_COLOURS = {
    "red": (0.85, 0.15, 0.15),
    "green": (0.2, 0.7, 0.25),
    "blue": (0.15, 0.3, 0.85),
    "yellow": (0.9, 0.85, 0.2),
    "purple": (0.6, 0.25, 0.7),
    "orange": (0.95, 0.55, 0.1),
    "white": (0.95, 0.95, 0.95),
    "black": (0.08, 0.08, 0.08),
}
_COLOUR_NAMES = tuple(_COLOURS)
_MODEL_RES = 32  # the encoding model sees images at this resolution


def render_image(image_id: int, seed: int = 0, size: int = 64) -> tuple[np.ndarray, dict]:
    """Draw synthetic image ``image_id``.

    Returns
    -------
    image : uint8 array of shape (size, size, 3)
    attributes : dict
        ``shapes`` (list of (kind, colour name)) and ``background`` colour names, used by the
        high-level part of the encoding model and for captions.
    """
    rng = np.random.default_rng([int(seed), int(image_id), 7919])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / (size - 1)
    bg_names = rng.choice(len(_COLOUR_NAMES), size=2, replace=False)
    c0 = np.array(_COLOURS[_COLOUR_NAMES[bg_names[0]]]) * rng.uniform(0.5, 0.8)
    c1 = np.array(_COLOURS[_COLOUR_NAMES[bg_names[1]]]) * rng.uniform(0.5, 0.8)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * xx + np.sin(angle) * yy
    ramp = (ramp - ramp.min()) / max(np.ptp(ramp), 1e-9)
    img = c0 * (1 - ramp)[..., None] + c1 * ramp[..., None]
    freq, ori, phase = rng.uniform(3, 10), rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
    amp = rng.uniform(0.03, 0.18)
    grating = np.sin(2 * np.pi * freq * (np.cos(ori) * xx + np.sin(ori) * yy) + phase)
    img = img + amp * grating[..., None]
    shapes = []
    for _ in range(int(rng.integers(1, 4))):
        kind = _SHAPES[int(rng.integers(len(_SHAPES)))]
        colour = _COLOUR_NAMES[int(rng.integers(len(_COLOUR_NAMES)))]
        cx, cy = rng.uniform(0.2, 0.8, size=2)
        r = rng.uniform(0.1, 0.28)
        if kind == "disc":
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
        elif kind == "square":
            mask = (np.abs(xx - cx) <= r * 0.85) & (np.abs(yy - cy) <= r * 0.85)
        else:  # upward triangle
            top = cy - r
            mask = (yy >= top) & (yy <= cy + r * 0.7) & (np.abs(xx - cx) <= (yy - top) * 0.6)
        shade = rng.uniform(0.85, 1.0)
        img[mask] = np.array(_COLOURS[colour]) * shade
        shapes.append((kind, colour))
    img = np.clip(img, 0, 1)
    attrs = {
        "shapes": shapes,
        "background": (_COLOUR_NAMES[bg_names[0]], _COLOUR_NAMES[bg_names[1]]),
    }
    return (img * 255 + 0.5).astype(np.uint8), attrs


def caption_for(attrs: dict) -> list[str]:
    """Two captions describing a synthetic image, from its attributes."""
    parts = [f"a {colour} {kind}" for kind, colour in attrs["shapes"]]
    things = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    bg = " and ".join(attrs["background"])
    first = f"{things} on a {bg} background"
    n = len(parts)
    second = f"{n} shape{'s' if n > 1 else ''} in front of a striped {attrs['background'][0]} wall"
    return [first, second]


class _EncodingModel:
    """The hidden encoding model shared by all subjects (see the module docstring)."""

    def __init__(self, seed: int, grid: int = 24):
        rng = np.random.default_rng([int(seed), 104729])
        g = (np.arange(grid) + 0.5) / grid
        uu, vv = np.meshgrid(g, g, indexing="ij")
        self.pos = np.stack([uu.ravel(), vv.ravel()], axis=1)  # (L, 2) sheet positions
        L = len(self.pos)
        # Retinotopy: visual-field centre follows the sheet; RF size grows with eccentricity.
        centre = self.pos.copy()
        ecc = np.linalg.norm(centre - 0.5, axis=1)
        sigma = 0.05 + 0.12 * ecc
        # Orientation map: angle of a sum of a few plane waves (pinwheel-like, smooth).
        k = rng.normal(size=(4, 2)) * 9
        ph = rng.uniform(0, 2 * np.pi, size=4)
        z = np.exp(1j * (self.pos @ k.T + ph)).sum(axis=1)
        theta = np.angle(z) / 2
        colour_map = np.sin(self.pos @ (rng.normal(size=2) * 7) + rng.uniform(0, 6.3))
        res = _MODEL_RES
        p = (np.arange(res) + 0.5) / res
        py, px = np.meshgrid(p, p, indexing="ij")
        px, py = px.ravel(), py.ravel()
        dx = px[None, :] - centre[:, 0:1]
        dy = py[None, :] - centre[:, 1:2]
        env = np.exp(-(dx**2 + dy**2) / (2 * sigma[:, None] ** 2))
        env /= env.sum(axis=1, keepdims=True)
        freq = 1.0 / (3.0 * sigma)
        proj = np.cos(theta)[:, None] * dx + np.sin(theta)[:, None] * dy
        self.g_even = (env * np.cos(2 * np.pi * freq[:, None] * proj)).astype(np.float32)
        self.g_odd = (env * np.sin(2 * np.pi * freq[:, None] * proj)).astype(np.float32)
        self.envelope = env.astype(np.float32)
        self.colour_pref = colour_map  # >0: red-green, <0: blue-yellow
        self.high_level = self.pos[:, 0] > 0.75
        n_attr = len(_SHAPES) + len(_COLOUR_NAMES)
        self.attr_weights = rng.normal(size=(L, n_attr)) * self.high_level[:, None]
        self.mix = rng.uniform(0.4, 1.0, size=(L, 3))  # energy, colour, luminance weights
        self._stats: tuple[np.ndarray, np.ndarray] | None = None

    def unit_parts(self, images: np.ndarray, attrs: Sequence[dict]) -> list[np.ndarray]:
        """Noise-free response components of the L sheet units, each of shape (n, L)."""
        n = images.shape[0]
        size = images.shape[1]
        step = size // _MODEL_RES
        small = images.reshape(n, _MODEL_RES, step, _MODEL_RES, step, 3).mean(axis=(2, 4)) / 255.0
        lum = small.mean(axis=-1).reshape(n, -1).astype(np.float32)
        rg = (small[..., 0] - small[..., 1]).reshape(n, -1).astype(np.float32)
        by = (small[..., 2] - small[..., :2].mean(axis=-1)).reshape(n, -1).astype(np.float32)
        energy = np.sqrt((lum @ self.g_even.T) ** 2 + (lum @ self.g_odd.T) ** 2 + 1e-8)
        opp = np.where(self.colour_pref > 0, rg @ self.envelope.T, by @ self.envelope.T)
        mean_lum = lum @ self.envelope.T
        a = np.zeros((n, len(_SHAPES) + len(_COLOUR_NAMES)))
        for i, at in enumerate(attrs):
            for kind, colour in at["shapes"]:
                a[i, _SHAPES.index(kind)] += 1
                a[i, len(_SHAPES) + _COLOUR_NAMES.index(colour)] += 1
        high = a @ self.attr_weights.T
        return [energy, np.abs(self.colour_pref) * opp, 0.5 * mean_lum, high]

    def combine(self, parts: list[np.ndarray], reference: slice) -> np.ndarray:
        """Unit responses (n, L): each part standardised with statistics of the ``reference`` rows."""
        z = [(p - p[reference].mean(0)) / (p[reference].std(0) + 1e-6) for p in parts[:3]]
        low = self.mix[:, 0] * z[0] + self.mix[:, 1] * z[1] + self.mix[:, 2] * z[2]
        r = np.where(self.high_level, 0.3 * low + parts[3], low)
        return r.astype(np.float32)


def _subject_layout(subject: int, n_voxels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Voxel positions on the sheet (n_voxels, 2) and per-voxel parameters (n_voxels, 4):
    signal gain, baseline, index of a cross-talk voxel, unit scale."""
    rng = np.random.default_rng([int(seed), int(subject), 15485863])
    base = rng.uniform(0.02, 0.98, size=(n_voxels, 2))
    a = rng.uniform(0.02, 0.05, size=2)
    f = rng.uniform(1.5, 3.0, size=2)
    ph = rng.uniform(0, 2 * np.pi, size=2)
    warped = base.copy()
    warped[:, 0] += a[0] * np.sin(2 * np.pi * f[0] * base[:, 1] + ph[0])
    warped[:, 1] += a[1] * np.sin(2 * np.pi * f[1] * base[:, 0] + ph[1])
    warped = np.clip(warped, 0, 1)
    # About a fifth of the voxels carry no signal, only noise.
    gain = rng.uniform(0.6, 1.6, size=n_voxels) * (rng.uniform(size=n_voxels) > 0.2)
    baseline = rng.normal(0, 2.0, size=n_voxels)
    other = rng.integers(0, n_voxels, size=n_voxels)
    scale = rng.uniform(0.5, 2.0, size=n_voxels)  # arbitrary units per voxel, as raw betas have
    return warped, np.stack([gain, baseline, other.astype(np.float64), scale], axis=1)


def _pooling_matrix(voxel_pos: np.ndarray, unit_pos: np.ndarray, width: float) -> np.ndarray:
    d2 = ((voxel_pos[:, None, :] - unit_pos[None, :, :]) ** 2).sum(-1)
    w = np.exp(-d2 / (2 * width**2))
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def surface_matrix(voxel_pos: np.ndarray, grid: int, radius_cells: float = 1.5) -> sparse.csr_matrix:
    """Sparse (grid*grid, n_voxels) matrix that resamples voxel values onto a 2-D grid.

    Each grid pixel is the Gaussian-weighted mean of the voxels within ``2 * radius_cells``
    cells; pixels with no voxel nearby are 0 (outside the cortical mask).
    """
    cell = 1.0 / grid
    g = (np.arange(grid) + 0.5) * cell
    gy, gx = np.meshgrid(g, g, indexing="ij")
    pix = np.stack([gx.ravel(), gy.ravel()], axis=1)
    sigma = radius_cells * cell
    rows, cols, vals = [], [], []
    for start in range(0, len(pix), 1024):
        block = pix[start : start + 1024]
        d2 = ((block[:, None, :] - voxel_pos[None, :, :]) ** 2).sum(-1)
        w = np.exp(-d2 / (2 * sigma**2))
        w[d2 > (2 * sigma) ** 2] = 0
        norm = w.sum(axis=1, keepdims=True)
        w = np.divide(w, norm, out=np.zeros_like(w), where=norm > 0)
        r, c = np.nonzero(w)
        rows.append(r + start)
        cols.append(c)
        vals.append(w[r, c])
    m = sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(len(pix), len(voxel_pos)),
        dtype=np.float32,
    )
    return m


class _SurfaceProjector:
    def __init__(self, matrix: sparse.csr_matrix, grid: int):
        self.matrix = matrix
        self.grid = grid

    def __call__(self, voxels: np.ndarray) -> np.ndarray:
        v = np.asarray(voxels, dtype=np.float32)
        return (self.matrix @ v.T).T.reshape(len(v), self.grid, self.grid)


def make_synthetic(
    seed: int = 0,
    subjects: Sequence[int] = DEFAULT_SUBJECTS,
    n_train: int = 1000,
    n_test: int = 100,
    image_size: int = 64,
    n_voxels: dict[int, int] | None = None,
    surface_size: int = 64,
    noise: float = 1.0,
    repetitions: int = 3,
) -> Dataset:
    """Build the synthetic dataset (see the module docstring).

    Parameters
    ----------
    seed : int
        Everything (images, encoding model, subjects, noise) is a function of the seed.
    subjects : sequence of int
        Subject numbers (1..8); each has its own voxel count and layout.
    n_train, n_test : int
        Training images per subject (distinct across subjects) and shared test images.
    image_size : int
        Image side in pixels; a multiple of 32.
    surface_size : int
        Side of the 2-D surface maps.
    noise : float
        Standard deviation of the noise of one repetition, relative to the signal's.
    repetitions : int
        Repetitions averaged per image.

    Returns
    -------
    Dataset
        Image ids: the test images are ``0..n_test-1``; subject ``s`` sees
        ``n_test + (s-1)*n_train + arange(n_train)``.
    """
    subjects = tuple(int(s) for s in subjects)
    voxel_items = tuple(sorted((int(k), int(v)) for k, v in (n_voxels or {}).items()))
    # Generation takes seconds; the same arguments give the same (read-only) dataset.
    return _make_synthetic(
        int(seed), subjects, int(n_train), int(n_test), int(image_size), voxel_items,
        int(surface_size), float(noise), int(repetitions),
    )


@functools.lru_cache(maxsize=4)
def _make_synthetic(seed, subjects, n_train, n_test, image_size, voxel_items, surface_size,
                    noise, repetitions) -> Dataset:
    subjects = list(subjects)
    n_voxels = dict(voxel_items)
    if not subjects:
        raise DataError("make_synthetic needs at least one subject.")
    if image_size % _MODEL_RES:
        raise DataError(f"image_size must be a multiple of {_MODEL_RES}, got {image_size}.")
    if n_train < 2 or n_test < 2:
        raise DataError(f"n_train and n_test must be at least 2, got {n_train} and {n_test}.")
    vox_counts = dict(DEFAULT_VOXELS)
    vox_counts.update(n_voxels or {})
    for s in subjects:
        if s not in vox_counts:
            raise DataError(f"Unknown synthetic subject {s}; give its voxel count in n_voxels.")
    spec = {
        "kind": "synthetic",
        "seed": int(seed),
        "subjects": subjects,
        "n_train": int(n_train),
        "n_test": int(n_test),
        "image_size": int(image_size),
        "n_voxels": {str(s): int(vox_counts[s]) for s in subjects},
        "surface_size": int(surface_size),
        "noise": float(noise),
        "repetitions": int(repetitions),
    }
    model = _EncodingModel(seed)
    all_ids = {"test": np.arange(n_test, dtype=np.int64)}
    for s in subjects:
        # Ids depend on the subject number only, so a subject's data is the same whichever
        # other subjects are generated with it.
        all_ids[s] = n_test + (s - 1) * n_train + np.arange(n_train, dtype=np.int64)
    id_list = np.concatenate(list(all_ids.values()))
    images = np.empty((len(id_list), image_size, image_size, 3), dtype=np.uint8)
    attrs = []
    for i, image_id in enumerate(id_list):
        images[i], a = render_image(int(image_id), seed, image_size)
        attrs.append(a)
    # Standardised with the shared test images' statistics, so that an image's response does
    # not depend on how many training images are generated beside it.
    units = model.combine(model.unit_parts(images, attrs), slice(0, n_test))
    mu = units[:n_test].mean(axis=0)
    sd = units[:n_test].std(axis=0) + 1e-6
    units = (units - mu) / sd
    captions = np.array([caption_for(a) for a in attrs])
    row_of = {int(image_id): i for i, image_id in enumerate(id_list)}

    data: dict[int, dict[str, SplitArrays]] = {}
    for s in subjects:
        V = vox_counts[s]
        pos, params = _subject_layout(s, V, seed)
        pool = _pooling_matrix(pos, model.pos, width=0.035)
        gain, baseline, other = params[:, 0], params[:, 1], params[:, 2].astype(int)
        scale = params[:, 3]
        projector = _SurfaceProjector(surface_matrix(pos, surface_size), surface_size)
        noise_rng = np.random.default_rng([int(seed), s, 32452843])
        splits = {}
        signal_sd = None
        for split, ids in (("train", all_ids[s]), ("test", all_ids["test"])):
            rows = np.array([row_of[int(i)] for i in ids])
            signal = units[rows] @ pool.T
            signal = signal + 0.15 * signal[:, other]
            if signal_sd is None:  # unit signal variance over the training images
                signal_sd = signal.std(axis=0, keepdims=True) + 1e-6
            signal = signal / signal_sd
            reps = gain * signal[None] + noise * noise_rng.standard_normal((repetitions,) + signal.shape)
            response = reps.mean(axis=0) * scale + baseline
            splits[split] = SplitArrays(
                voxels=_read_only(response.astype(np.float32)),
                ids=_read_only(ids.copy()),
                images=_read_only(images[rows]),
                captions=_read_only(captions[rows]),
            )
        # Surface maps of both splits use the subject's training statistics.
        to_surface = _StandardisedProjector(projector, splits["train"].voxels)
        splits["train"].surface_fn = to_surface
        splits["test"].surface_fn = to_surface
        data[s] = splits
    return Dataset(data, spec=spec, name=f"synthetic(seed={seed})", ids_are_nsd=False)


def _read_only(a: np.ndarray) -> np.ndarray:
    # The dataset is cached and shared between callers: nobody may modify it in place.
    a.setflags(write=False)
    return a


class _StandardisedProjector:
    """Surface maps of voxels z-scored with one subject's training statistics."""

    def __init__(self, projector: _SurfaceProjector, train_voxels: np.ndarray):
        self.projector = projector
        self.mean = train_voxels.mean(axis=0)
        self.std = train_voxels.std(axis=0) + 1e-6

    def __call__(self, voxels: np.ndarray) -> np.ndarray:
        return self.projector((np.asarray(voxels, dtype=np.float32) - self.mean) / self.std)
