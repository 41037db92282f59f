"""Fuzz every file of a saved NeuroPictor decoder and of BrainGuard and NeuroPictor training
checkpoints (issue 16, models and checkpoints).

The corruptions are those of ``test_fuzz_files``: truncation at 10/50/90 %, the last byte cut,
an empty file, garbage bytes, a directory in place of the file, not-JSON, JSON of the wrong
kind, a missing, null or extra field, a missing or an extra tensor, a tensor as float16 or one
row short.

* Saved decoders (stages pretrain and encoder): ``load_decoder`` and ``predict`` (the encoder
  stage: its autoencoder on the test maps), which consume every weight, must end in a
  :class:`BrainreconError` naming the file, or give exactly the intact decoder's predictions.
* Checkpoints: the file is damaged in the newest checkpoint and the fit is resumed. With an
  older checkpoint beside it, the resume falls back to it, says so naming the damaged file
  (a warning for BrainGuard, a line for NeuroPictor), and ends exactly like the uninterrupted
  run; or the damage is harmless and the result is the same without a word. With no older
  checkpoint left, the resume is a :class:`BrainreconError` naming the file (or, harmless,
  the same result).
"""

from __future__ import annotations

import contextlib
import io
import shutil
import warnings
from pathlib import Path

import pytest
from test_fuzz_files import _bytes_cases, _copy, _directory, _json_cases, _same, _safetensors_cases
from test_neuropictor import TINY

from brainrecon.errors import BrainreconError

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

NP = {**TINY, "base_model": "tiny", "stage": "pretrain", "subjects": [1], "seed": 3, "lr": 1e-3}
NP_DECODER = {"brainrecon.json": "json", "fmri_encoder.safetensors": "safetensors",
              "semantic.safetensors": "safetensors", "feature_transform.safetensors": "safetensors",
              "empty_context.safetensors": "safetensors", "controlnet/config.json": "json",
              "controlnet/diffusion_pytorch_model.safetensors": "safetensors"}
NP_ENCODER = {"brainrecon.json": "json", "fmri_encoder.safetensors": "safetensors",
              "fmri_autoencoder_head.safetensors": "safetensors"}
NP_CHECKPOINT = {"step_00000003/trainer.json": "json", "step_00000003/optimizer.json": "json",
                 "step_00000003/trainable.safetensors": "safetensors",
                 "step_00000003/optimizer.safetensors": "safetensors"}
NP_OLDER = "step_00000002"
BG = {"subjects": [1, 2], "hidden": 16, "n_blocks": 2, "rounds": 2, "batch_size": 30, "device": "cpu",
      "progress": False, "target_options": {"size": 8}, "checkpoint_keep": 2}
BG_CHECKPOINT = {"latest.json": "json", "round-00002/checkpoint.json": "json",
                 "round-00002/global.safetensors": "safetensors",
                 "round-00002/client-1.safetensors": "safetensors",
                 "round-00002/client-2.safetensors": "safetensors"}
BG_OLDER = "round-00001"
FAMILIES = {"json": _json_cases, "safetensors": _safetensors_cases}


def _cases(path: Path, family: str) -> dict:
    return {**_bytes_cases(path), "a directory": _directory, **FAMILIES[family](path)}


def _as_numpy(state) -> dict:
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


# --------------------------------------------------------------------------- sources
@pytest.fixture(scope="module")
def np_data():
    from brainrecon.data.synthetic import make_synthetic

    return make_synthetic(seed=0, subjects=(1,), n_train=8, n_test=2, image_size=32, surface_size=16)


@pytest.fixture(scope="module")
def np_saved(tmp_path_factory, np_data):
    from brainrecon.decoders.neuropictor import NeuroPictorDecoder

    root = tmp_path_factory.mktemp("fuzz-np")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        NeuroPictorDecoder(**NP, steps=1).fit(np_data.train).save(root / "pretrain")
        NeuroPictorDecoder(**{**NP, "stage": "encoder"}, steps=1).fit(np_data.train).save(root / "encoder")
    return {stage: (root / stage, _np_use(root / stage, np_data)) for stage in ("pretrain", "encoder")}


def _np_use(path: Path, data) -> dict:
    """Stage pretrain: predict (every weight but the bypassed auxiliary branch takes part, and
    that is checked on loading); stage encoder: the autoencoder's reconstruction of the maps."""
    import torch

    from brainrecon.decoders import load_decoder

    decoder = load_decoder(path)
    if decoder.stage_ != "encoder":
        return {"predict": decoder.predict(data.test)[1]}
    with torch.no_grad():
        maps = decoder.net_(torch.from_numpy(decoder._test_surfaces(data.test, 1)))
    return {"autoencoder": maps.numpy()}


def _np_fit(data, ck: Path, resume: bool):
    from brainrecon.decoders.neuropictor import NeuroPictorDecoder

    fitted = NeuroPictorDecoder(**NP, steps=3, checkpoint_every=1, checkpoint_dir=str(ck),
                                resume=resume).fit(data.train)
    return {"losses": fitted.losses_, "weights": _as_numpy(fitted.net_.state_dict())}


@pytest.fixture(scope="module")
def np_checkpoints(tmp_path_factory, np_data):
    ck = tmp_path_factory.mktemp("fuzz-np-ck") / "ck"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        full = _np_fit(np_data, ck, resume=False)
    return ck, full, lambda copy: _np_fit(np_data, copy, resume=True)


@pytest.fixture(scope="module")
def bg_checkpoints(tmp_path_factory):
    from brainrecon.data.synthetic import make_synthetic

    data = make_synthetic(seed=0, subjects=(1, 2), n_train=60, n_test=6, image_size=32, surface_size=32)
    ck = tmp_path_factory.mktemp("fuzz-bg-ck") / "ck"

    def fit(directory: Path, resume: bool) -> dict:
        from brainrecon.decoders.brainguard import BrainGuardDecoder

        fitted = BrainGuardDecoder(**BG, checkpoint_dir=str(directory), resume=resume).fit(data.train)
        return {"history": fitted.history_, "predict": fitted.predict(data.test)}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = fit(ck, resume=False)
    return ck, full, lambda copy: fit(copy, resume=True)


# --------------------------------------------------------------------------- saved decoder
def _check_decoder_case(src: Path, intact: dict, rel: str, name: str, corrupt, scratch: Path, use) -> str | None:
    copy = _copy(src, scratch / src.name)
    try:
        corrupt(copy / rel)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = use(copy)
        except BrainreconError as exc:
            if rel.split("/")[-1] not in str(exc):
                return f"{rel} {name}: the error does not name the file: {exc}"[:400]
            return None
        except Exception as exc:  # noqa: BLE001 - this is what the suite looks for
            return f"{rel} {name}: {type(exc).__name__}: {exc}"[:400]
        if not _same(got, intact):
            return f"{rel} {name}: accepted with a different answer"
        return None
    finally:
        shutil.rmtree(copy, ignore_errors=True)


NP_SAVED = {"pretrain": NP_DECODER, "encoder": NP_ENCODER}


@pytest.mark.parametrize("stage,rel", [(stage, rel) for stage, layout in NP_SAVED.items() for rel in layout])
def test_every_corruption_of_a_saved_neuropictor_file_is_a_clear_error_or_harmless(np_saved, np_data, tmp_path,
                                                                                  stage, rel):
    src, intact = np_saved[stage]
    cases = _cases(src / rel, NP_SAVED[stage][rel])
    use = lambda path: _np_use(path, np_data)  # noqa: E731
    failures = [f for name, corrupt in cases.items()
                if (f := _check_decoder_case(src, intact, rel, name, corrupt, tmp_path, use)) is not None]
    assert not failures, f"{len(failures)} of {len(cases)} corruptions went wrong:\n" + "\n".join(failures)
    assert _same(_np_use(src, np_data), intact)


def test_layout_covers_every_file_of_a_saved_neuropictor_decoder(np_saved):
    for stage, (path, _) in np_saved.items():
        assert {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()} == set(NP_SAVED[stage]), stage


# --------------------------------------------------------------------------- checkpoints
def _check_resume_case(src: Path, intact: dict, rel: str, name: str, corrupt, scratch: Path, resume,
                       older: str | None) -> str | None:
    """``older``: the older checkpoint to fall back on; None removes it first."""
    copy = _copy(src, scratch / src.name)
    what = f"{rel} {name} ({'with' if older else 'without'} an older checkpoint)"
    file = rel.split("/")[-1]
    try:
        if older is None:
            for old in (p for p in copy.iterdir() if p.is_dir() and p.name != rel.split("/")[0]):
                shutil.rmtree(old)
        corrupt(copy / rel)
        out = io.StringIO()
        try:
            with warnings.catch_warnings(record=True) as seen, contextlib.redirect_stdout(out):
                warnings.simplefilter("always")
                got = resume(copy)
        except BrainreconError as exc:
            if older is not None:
                return f"{what}: an error although {older} is intact: {exc}"[:400]
            if file not in str(exc):
                return f"{what}: the error does not name the file: {exc}"[:400]
            return None
        except Exception as exc:  # noqa: BLE001 - this is what the suite looks for
            return f"{what}: {type(exc).__name__}: {exc}"[:400]
        said = [str(w.message) for w in seen] + out.getvalue().splitlines()
        skipped = [s for s in said if "Skipping damaged checkpoint" in s]
        if skipped and not any(file in s for s in skipped):
            return f"{what}: fell back without naming the file: {skipped}"[:400]
        if not _same(got, intact):
            return f"{what}: resumed to a different result ({'after' if skipped else 'without'} a fallback)"
        return None
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def _fuzz_checkpoint(src: Path, intact: dict, resume, layout: dict, older: str, rel: str, scratch: Path) -> None:
    cases = _cases(src / rel, layout[rel])
    variants = (older, None) if rel != "latest.json" else (older,)  # latest.json is outside the rounds
    failures = [f for name, corrupt in cases.items() for keep in variants
                if (f := _check_resume_case(src, intact, rel, name, corrupt, scratch, resume, keep)) is not None]
    assert not failures, (f"{len(failures)} of {len(cases) * len(variants)} resumes ({len(cases)} corruptions) "
                          f"went wrong:\n" + "\n".join(failures))


@pytest.mark.parametrize("rel", list(BG_CHECKPOINT))
def test_every_corruption_of_a_brainguard_checkpoint_file_falls_back_or_names_it(bg_checkpoints, tmp_path, rel):
    src, intact, resume = bg_checkpoints
    _fuzz_checkpoint(src, intact, resume, BG_CHECKPOINT, BG_OLDER, rel, tmp_path)


@pytest.mark.parametrize("rel", list(NP_CHECKPOINT))
def test_every_corruption_of_a_neuropictor_checkpoint_file_falls_back_or_names_it(np_checkpoints, tmp_path, rel):
    src, intact, resume = np_checkpoints
    _fuzz_checkpoint(src, intact, resume, NP_CHECKPOINT, NP_OLDER, rel, tmp_path)


def test_layout_covers_every_file_of_the_newest_checkpoints(bg_checkpoints, np_checkpoints):
    for path, layout, older in ((bg_checkpoints[0], BG_CHECKPOINT, BG_OLDER), (np_checkpoints[0], NP_CHECKPOINT, NP_OLDER)):
        found = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}
        assert {f for f in found if not f.startswith(older + "/")} == set(layout), path
        assert {f.replace(older, "X") for f in found if f.startswith(older + "/")} == \
            {f.replace(f.split("/")[0], "X") for f in layout if "/" in f}
