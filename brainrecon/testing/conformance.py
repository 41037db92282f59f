"""The tests every decoder gets, built-in or plugin: subclass :class:`DecoderConformance`.

A plugin's own test suite (pytest) writes::

    from brainrecon.testing import DecoderConformance

    class TestMyDecoder(DecoderConformance):
        def make_decoder(self, **overrides):
            return MyDecoder(**{"seed": 0, **overrides})

        def make_data(self):
            from brainrecon.data.synthetic import make_synthetic
            return make_synthetic(seed=0, n_train=60, n_test=8, image_size=32, surface_size=32, subjects=(1,))

and gets the checks brainrecon's own decoders pass: registered by name, ``fit`` returns
``self``, predictions aligned with the test ids, ``save`` → ``load`` gives identical
predictions, bad input is a clear error. Subclasses implement ``make_decoder(**overrides)``
(an unfitted decoder, small and fast) and ``make_data()`` (a dataset it can fit), and may set
``fit_subjects`` when the decoder is fitted on several subjects. Needs pytest (the ``test``
extra).
"""

from __future__ import annotations

import numpy as np
import pytest

from brainrecon.data import from_arrays
from brainrecon.decoders import Decoder, available, load_decoder
from brainrecon.errors import DataError, NotFittedError


class DecoderConformance:
    #: Override: whether the decoder's seed makes fitting deterministic.
    deterministic = True

    def make_decoder(self, **overrides) -> Decoder:  # pragma: no cover - abstract
        raise NotImplementedError

    def make_data(self):  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    @pytest.fixture
    def fitted(self):
        # Fitted once per test class (stored on the class), shared by its tests.
        cls = type(self)
        if "_fitted_once" not in cls.__dict__:
            data = self.make_data()
            decoder = self.make_decoder()
            cls._fitted_once = (data, decoder, decoder.fit(data.train))
        return cls._fitted_once

    # ------------------------------------------------------------------ the tests
    def test_is_registered(self):
        decoder = self.make_decoder()
        assert decoder.name in available()
        assert decoder.predicts in ("target", "images")

    def test_fit_returns_self(self, fitted):
        _, decoder, returned = fitted
        assert returned is decoder

    def test_predict_shapes_and_alignment(self, fitted):
        data, decoder, _ = fitted
        pred = decoder.predict(data.test)
        assert set(pred) == set(decoder.subjects_)
        for s, p in pred.items():
            assert len(p) == len(data.test.ids(s))
            assert np.all(np.isfinite(np.asarray(p, dtype=np.float64)))
            if decoder.predicts == "images":
                assert p.dtype == np.uint8 and p.ndim == 4 and p.shape[-1] == 3

    def test_save_load_identical_predictions(self, fitted, tmp_path):
        data, decoder, _ = fitted
        decoder.save(tmp_path / "saved")
        loaded = load_decoder(tmp_path / "saved")
        assert type(loaded) is type(decoder)
        assert loaded.get_params().keys() == decoder.get_params().keys()
        a, b = decoder.predict(data.test), loaded.predict(data.test)
        for s in a:
            np.testing.assert_array_equal(a[s], b[s])

    def test_save_refuses_to_overwrite(self, fitted, tmp_path):
        _, decoder, _ = fitted
        decoder.save(tmp_path / "saved")
        with pytest.raises(Exception, match="already exists"):
            decoder.save(tmp_path / "saved")

    def test_same_seed_same_output(self, fitted):
        if not self.deterministic:
            pytest.skip("decoder declared non-deterministic")
        data, decoder, _ = fitted
        again = self.make_decoder().fit(data.train)
        a, b = decoder.predict(data.test), again.predict(data.test)
        for s in a:
            np.testing.assert_allclose(np.asarray(a[s], np.float64), np.asarray(b[s], np.float64),
                                       rtol=1e-5, atol=1e-6)

    def test_predict_before_fit_raises(self):
        data = self.make_data()
        with pytest.raises(NotFittedError, match="not fitted"):
            self.make_decoder().predict(data.test)

    def test_wrong_voxel_count_raises(self, fitted):
        data, decoder, _ = fitted
        s = decoder.subjects_[0]
        n_vox = decoder.n_voxels_[s]
        wrong = {}
        for s2 in data.subjects:
            arrays = {}
            for split in ("train", "test"):
                X = data.train.voxels(s2) if split == "train" else data.test.voxels(s2)
                cut = X[:, : n_vox - 3] if s2 == s else X
                arrays[f"{split}_voxels"] = cut
                arrays[f"{split}_ids"] = getattr(data, split).ids(s2)
                sf = getattr(data, split).surfaces(s2)
                if sf is not None:
                    arrays[f"{split}_surfaces"] = sf[:, :-1, :-1] if s2 == s else sf
                arrays[f"{split}_images"] = getattr(data, split).images(s2)
                caps = getattr(data, split).captions(s2)
                if caps is not None:
                    arrays[f"{split}_captions"] = caps
            wrong[s2] = arrays
        bad = from_arrays(wrong)
        with pytest.raises(DataError, match=rf"{n_vox}.*{n_vox - 3}|{n_vox - 3}.*{n_vox}|shape"):
            decoder.predict(bad.test)

    def test_get_set_params_roundtrip(self):
        decoder = self.make_decoder()
        params = decoder.get_params()
        clone = type(decoder)(**params)
        assert clone.get_params() == params
