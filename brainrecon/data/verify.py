"""Check one source of a subject's data against another (``brainrecon data verify A B``).

What a methods section needs to say when its data came from somewhere else than the decoder it
is compared with: are the test images the same (and in the same order; which convention, 982 or
1000), the same voxels (count), the same responses (per-voxel correlation of the averaged betas
over the images both sources share, each after its own normalisation — MindEye's session-wise
z-scoring and Brain-Diffuser's raw betas differ by an affine map per session, so correlation
rather than equality is the test), and the same images (after resizing both to a common size).

Everything joins on the 0-based NSD 73k id; both sources must carry it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from brainrecon.data.dataset import Dataset, test_convention
from brainrecon.errors import DataError

#: Median per-voxel correlation above which two sources count as the same responses.
MIN_MEDIAN_CORRELATION = 0.9
#: Mean absolute pixel difference (0-255, after resizing) below which images count as equal
#: (JPEG re-encoding and resampling stay well under it).
MAX_IMAGE_DIFFERENCE = 12.0


@dataclass
class VerifyReport:
    """The comparison of two sources for one subject; ``ok`` when no check failed."""

    subject: int
    a: str
    b: str
    checks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.checks)

    def add(self, name: str, ok: bool, detail: str, **values: Any) -> None:
        self.checks.append({"check": name, "ok": bool(ok), "detail": detail, **values})

    def text(self) -> str:
        lines = [f"Subject {self.subject}: {self.a} vs {self.b}"]
        for c in self.checks:
            lines.append(f"  [{'ok' if c['ok'] else 'MISMATCH'}] {c['check']}: {c['detail']}")
        lines.append("  verdict: " + ("consistent" if self.ok else "the sources differ (see MISMATCH lines)"))
        return "\n".join(lines)


def _describe(ds: Dataset) -> str:
    kind = ds.spec.get("kind", "data")
    where = ds.spec.get("path")
    return f"{kind} ({where})" if where else kind


def verify_sources(a: Dataset, b: Dataset, subject: int, *, max_images: int = 64,
                   image_size: int = 64) -> VerifyReport:
    """Compare subject ``subject`` in datasets ``a`` and ``b`` (see the module docstring).

    Parameters
    ----------
    max_images : int
        Shared images whose pixels are compared (evenly spaced over the shared test images).
    image_size : int
        Side both images are resized to before comparing.
    """
    subject = int(subject)
    for ds in (a, b):
        ds._get(subject, "train")
        if not ds.ids_are_nsd:
            raise DataError(f"{_describe(ds)} carries no NSD 73k image ids, so its images cannot be matched with another "
                            f"source's; prepare it with `brainrecon prepare-nsd` (which writes the ids).")
    report = VerifyReport(subject, _describe(a), _describe(b))
    ta, tb = a.test.ids(subject), b.test.ids(subject)
    same_set = set(ta.tolist()) == set(tb.tolist())
    conv_a, conv_b = test_convention(len(ta), True), test_convention(len(tb), True)
    if not same_set:
        only_a, only_b = np.setdiff1d(ta, tb), np.setdiff1d(tb, ta)
        report.add("test images", False, f"different test sets: {len(ta)} ({conv_a}) vs {len(tb)} ({conv_b}); "
                   f"{len(only_a)} only in A, {len(only_b)} only in B", n_a=len(ta), n_b=len(tb))
    else:
        report.add("test images", True, f"the same {len(ta)} images ({conv_a})", n_a=len(ta), n_b=len(tb))
        same_order = np.array_equal(ta, tb)
        report.add("test order", same_order, "same order" if same_order else
                   "same images in a different order: predictions of one are not row-aligned with the other's "
                   "(brainrecon aligns by id; scripts that index by row do not)")
    va, vb = a.n_voxels(subject), b.n_voxels(subject)
    report.add("voxels", va == vb, f"{va} vs {vb} voxels" + ("" if va == vb else
               ": different ROI masks or a dropped voxel; responses cannot be compared voxel by voxel"),
               n_voxels_a=va, n_voxels_b=vb)
    ids_a, vox_a = _all_images(a, subject)
    ids_b, vox_b = _all_images(b, subject)
    shared, ia, ib = np.intersect1d(ids_a, ids_b, return_indices=True)
    if va == vb and len(shared) >= 3:
        r = _columnwise_correlation(vox_a(ia), vox_b(ib))
        med, p5 = float(np.nanmedian(r)), float(np.nanpercentile(r, 5))
        report.add("responses", med >= MIN_MEDIAN_CORRELATION,
                   f"per-voxel correlation of averaged betas over {len(shared)} shared images: median {med:.3f}, "
                   f"5th percentile {p5:.3f} (each source after its own normalisation: "
                   f"{a.spec.get('normalisation', 'as stored')}; {b.spec.get('normalisation', 'as stored')})",
                   median_r=med, p5_r=p5, n_shared=len(shared))
    elif va == vb:
        report.add("responses", False, f"only {len(shared)} images in common; nothing to correlate")
    test_shared = np.intersect1d(ta, tb)
    picked = test_shared[np.linspace(0, len(test_shared) - 1, min(max_images, len(test_shared))).astype(int)] \
        if len(test_shared) else test_shared
    if len(picked):
        diff = _image_difference(a, b, subject, picked, image_size)
        if diff is None:
            report.add("images", True, "not compared: a source has no images")
        else:
            report.add("images", diff <= MAX_IMAGE_DIFFERENCE,
                       f"mean absolute difference {diff:.2f} (of 255) over {len(picked)} test images resized to "
                       f"{image_size}x{image_size}", mean_abs_diff=diff)
    return report


def _all_images(ds: Dataset, subject: int):
    """Ids of train + test images and a function rows -> averaged voxels (float64)."""
    ids = np.concatenate([ds.train.ids(subject), ds.test.ids(subject)])
    n_train = ds.train.n_images(subject)

    def voxels(rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows)
        out = np.empty((len(rows), ds.n_voxels(subject)), dtype=np.float64)
        tr, te = rows < n_train, rows >= n_train
        if tr.any():
            out[tr] = _rows(ds.train, subject, rows[tr])
        if te.any():
            out[te] = _rows(ds.test, subject, rows[te] - n_train)
        return out

    return ids, voxels


def _rows(split, subject: int, rows: np.ndarray) -> np.ndarray:
    source = split._arrays(subject).voxels
    order = np.argsort(rows)
    out = np.empty((len(rows), np.shape(source)[1]), dtype=np.float64)
    out[order] = np.asarray(source[rows[order]], dtype=np.float64)
    return out


def _columnwise_correlation(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    den = np.sqrt((x * x).sum(axis=0) * (y * y).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (x * y).sum(axis=0) / den


def _image_difference(a: Dataset, b: Dataset, subject: int, ids: np.ndarray, size: int) -> float | None:
    from PIL import Image

    diffs = []
    if a.test._arrays(subject).images is None or b.test._arrays(subject).images is None:
        return None
    rows_a = _rows_of(a.test.ids(subject), ids)
    rows_b = _rows_of(b.test.ids(subject), ids)
    ia, ib = a.test.images(subject, rows_a), b.test.images(subject, rows_b)
    for x, y in zip(ia, ib):
        xs = np.asarray(Image.fromarray(x).resize((size, size), Image.BILINEAR), dtype=np.float32)
        ys = np.asarray(Image.fromarray(y).resize((size, size), Image.BILINEAR), dtype=np.float32)
        diffs.append(np.abs(xs - ys).mean())
    return float(np.mean(diffs))


def _rows_of(all_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    pos = {int(i): r for r, i in enumerate(all_ids)}
    return np.array([pos[int(i)] for i in ids], dtype=np.int64)


__all__ = ["VerifyReport", "verify_sources"]
