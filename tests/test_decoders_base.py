import json

import numpy as np
import pytest

from brainrecon.decoders import Decoder, available, get_decoder, load_decoder, register
from brainrecon.decoders import _REGISTRY
from brainrecon.errors import BrainreconError, DataError, NotFittedError
from brainrecon.io import write_npz_atomic


class MeanDecoder(Decoder):
    """Predicts the training-target mean: a test double for the base-class machinery."""

    name = "mean-test"
    summary = "test double"

    def __init__(self, *, subject=None, target="pixels", shrink=1.0):
        self.subject = subject
        self.target = target
        self.shrink = shrink

    def fit(self, train):
        s = self.subject if self.subject is not None else train.subjects[0]
        from brainrecon.targets import get_target

        Y = get_target(self.target, size=4).load(train, s, progress=False)
        self.mean_ = Y.mean(axis=0) * self.shrink
        self.subjects_ = [s]
        self.n_voxels_ = {s: train.voxels(s).shape[1]}
        return self

    def predict(self, test):
        out = {}
        for s in self._predict_subjects(test):
            X = test.voxels(s)
            self._check_voxels(X, s)
            out[s] = np.repeat(self.mean_[None], len(X), axis=0)
        return out

    def _save_weights(self, directory):
        write_npz_atomic(directory / "weights.npz", mean=self.mean_)
        return {"files": ["weights.npz"]}

    def _load_weights(self, directory, state):
        self.mean_ = np.load(directory / "weights.npz")["mean"]


@pytest.fixture(autouse=True)
def _registered():
    register("mean-test", f"{__name__}:MeanDecoder")
    yield
    _REGISTRY.pop("mean-test", None)


def test_unknown_decoder_lists_available():
    with pytest.raises(BrainreconError, match=r"Unknown decoder 'rige'. Available decoders: 'brainguard', .*'ridge'"):
        get_decoder("rige")


def test_unknown_parameter():
    with pytest.raises(BrainreconError, match=r"Unknown parameter\(s\) 'alpha' for decoder 'mean-test'.*'shrink'"):
        get_decoder("mean-test", alpha=3)


def test_params_and_repr():
    d = get_decoder("mean-test", shrink=0.5)
    assert d.get_params() == {"subject": None, "target": "pixels", "shrink": 0.5}
    assert repr(d) == "MeanDecoder(shrink=0.5)"
    d.set_params(shrink=2.0)
    assert d.shrink == 2.0
    with pytest.raises(BrainreconError, match=r"Unknown parameter\(s\) 'x'"):
        d.set_params(x=1)


def test_save_load_round_trip_and_errors(small_data, tmp_path):
    d = MeanDecoder(shrink=0.5).fit(small_data.train)
    d.save(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "brainrecon.json").read_text())
    assert config["decoder"] == "mean-test" and config["format_version"] == 1
    assert config["params"]["shrink"] == 0.5 and config["subjects"] == [1]
    loaded = load_decoder(tmp_path / "m")
    assert isinstance(loaded, MeanDecoder)
    np.testing.assert_array_equal(loaded.predict(small_data.test)[1], d.predict(small_data.test)[1])
    assert not list(tmp_path.glob(".*partial"))

    with pytest.raises(BrainreconError, match="brainrecon.json is missing"):
        load_decoder(tmp_path)
    config["format_version"] = 99
    (tmp_path / "m" / "brainrecon.json").write_text(json.dumps(config))
    with pytest.raises(BrainreconError, match="format version 99.*reads format version 1"):
        load_decoder(tmp_path / "m")


def test_save_is_atomic_on_failure(small_data, tmp_path, monkeypatch):
    d = MeanDecoder().fit(small_data.train)

    def broken(directory):
        (directory / "half.npz").write_bytes(b"x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(d, "_save_weights", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        d.save(tmp_path / "m")
    assert not (tmp_path / "m").exists()
    assert list(tmp_path.iterdir()) == []


def test_not_fitted_and_wrong_subject(small_data):
    with pytest.raises(NotFittedError, match="not fitted yet"):
        MeanDecoder().predict(small_data.test)
    d = MeanDecoder(subject=2).fit(small_data.train)
    with pytest.raises(DataError, match=r"test data has subject\(s\) \[5\].*fitted on subject\(s\) \[2\]"):
        d.predict(small_data.select([5]).test)


def test_registry_lists_the_three_decoders():
    assert {"ridge", "brainguard", "neuropictor"} <= set(available())


class MultiMeanDecoder(MeanDecoder):
    """The same double, declared multi-subject (parameter ``subjects``)."""

    name = "multi-mean-test"
    multi_subject = True

    def __init__(self, *, subjects=None, target="pixels", shrink=1.0):
        self.subjects = subjects
        self.target = target
        self.shrink = shrink


def test_one_parameter_check_for_set_params_get_decoder_and_fit(small_data):
    """set_params, get_decoder, for_subjects and the fit workflow refuse an unknown parameter
    with the same error (Decoder.check_params), listing the valid ones."""
    from brainrecon import workflows

    expected = r"Unknown parameter\(s\) 'alpha' for decoder 'mean-test'. Valid parameters: 'subject', 'target', 'shrink'\."
    MeanDecoder.check_params({"shrink": 2.0, "subject": 1})  # valid: nothing raised
    attempts = (lambda: MeanDecoder().set_params(alpha=3), lambda: get_decoder("mean-test", alpha=3),
                lambda: MeanDecoder.for_subjects([1], alpha=3),
                lambda: workflows.fit("mean-test", dataset=small_data, params={"alpha": 3}, evaluate=False))
    for attempt in attempts:
        with pytest.raises(BrainreconError, match=expected):
            attempt()


def test_for_subjects_uses_the_keyword_the_class_declares():
    single = MeanDecoder.for_subjects([2], shrink=0.5)
    assert single.get_params() == {"subject": 2, "target": "pixels", "shrink": 0.5}
    multi = MultiMeanDecoder.for_subjects((1, 5), shrink=0.5)
    assert multi.get_params() == {"subjects": [1, 5], "target": "pixels", "shrink": 0.5}
    with pytest.raises(BrainreconError, match=r"'mean-test' is fitted on one subject at a time, got subjects \[1, 2\]"):
        MeanDecoder.for_subjects([1, 2])
    with pytest.raises(BrainreconError, match="Parameter 'subject' is set from the subjects to fit") as caught:
        MeanDecoder.for_subjects([1], subject=2)
    assert caught.value.parameters == ("subjects",)


def test_device_defaults_to_auto_for_every_built_in_decoder():
    from brainrecon.decoders import get_decoder_class

    for name in ("ridge", "brainguard", "neuropictor"):
        assert get_decoder_class(name).default_params()["device"] == "auto", name
