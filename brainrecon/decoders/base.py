"""The one interface every decoder implements.

A decoder is built from keyword parameters only (stored unchanged, scikit-learn style), is
fitted on a :class:`~brainrecon.data.Split` (not a bare array: ridge wants one subject's
voxels and targets, BrainGuard several subjects at once, NeuroPictor surface maps, images
and captions), predicts a mapping ``subject -> array`` aligned with ``test.ids(subject)``,
and saves itself as a directory::

    brainrecon.json     decoder name, parameters, format version, brainrecon version, state
    *.npz / *.safetensors   weights (never pickle)

What a decoder predicts is declared by :attr:`Decoder.predicts`: ``"target"`` (values in a
target space such as IP-Adapter tokens or low-resolution pixels, turned into images by a
generator) or ``"images"`` (uint8 images, as NeuroPictor produces itself).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
import inspect
import os
from pathlib import Path
from typing import Any, ClassVar, Iterable

import numpy as np

from brainrecon import __version__
from brainrecon.errors import BrainreconError, DataError, NotFittedError
from brainrecon.io import atomic_directory, jsonable, read_json, restore_directory, write_json_atomic

CONFIG_FILE = "brainrecon.json"

PREDICTS = ("target", "images")


@dataclass(frozen=True)
class CliOption:
    """A decoder parameter offered as its own ``brainrecon fit`` option.

    ``kind`` is ``"int"``, ``"float"``, ``"str"``, ``"path"`` or ``"floats"`` (a comma-separated
    list, e.g. an alpha grid); ``choices`` restricts a ``"str"``. ``brainrecon fit --help``
    shows each decoder's options in a panel under its name; a plugin's appear too.
    """

    param: str
    flag: str
    kind: str = "str"
    help: str = ""
    choices: tuple[str, ...] = ()


class Decoder(abc.ABC):
    """Base class of brainrecon decoders.

    Subclasses define a keyword-only ``__init__`` that stores every argument unchanged as
    an attribute of the same name, and implement :meth:`fit`, :meth:`predict`,
    :meth:`_save_weights` and :meth:`_load_weights`.
    """

    #: Registry name (``--decoder`` value).
    name: ClassVar[str] = ""
    #: ``"target"`` or ``"images"``.
    predicts: ClassVar[str] = "target"
    #: One line shown by ``brainrecon decoders``.
    summary: ClassVar[str] = ""
    #: Parameters listed by ``brainrecon decoders``.
    main_params: ClassVar[tuple[str, ...]] = ()
    #: Parameters offered as their own ``brainrecon fit`` options (any parameter also works
    #: as ``--param name=value``).
    cli_options: ClassVar[tuple[CliOption, ...]] = ()
    #: Version of the saved layout; bump when :meth:`_load_weights` can no longer read old saves.
    format_version: ClassVar[int] = 1
    #: True for decoders fitted on several subjects at once (parameter ``subjects``); they
    #: implement :meth:`for_subject`. False for one-subject decoders (parameter ``subject``).
    multi_subject: ClassVar[bool] = False
    #: How to cite the method (model cards of published runs, the docs).
    citation: ClassVar[str] = ""
    #: True when a run may hold only its own subject's data: nothing of another subject (voxel
    #: counts, data spec, private layers) is written beside one subject's run (federated decoders).
    private_runs: ClassVar[bool] = False

    # ------------------------------------------------------------------ the contract
    @property
    def reconstructs_images(self) -> bool:
        """Whether this decoder's predictions become images (False, e.g., for a training stage
        that only calibrates an encoder): a run then has no predictions nor reconstructions."""
        return True

    def target_space(self) -> tuple[str, dict[str, Any]] | None:
        """``(name, options)`` of the target space this decoder predicts (built by
        :func:`brainrecon.targets.get_target`), or None when it predicts images. Decoders that
        predict a target space take it as parameters ``target`` and ``target_options``."""
        name = getattr(self, "target", None) if self.predicts == "target" else None
        if name is None:
            return None
        return str(name), dict(getattr(self, "target_options", None) or {})

    # ------------------------------------------------------------------ parameters
    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        names = []
        for p in sig.parameters.values():
            if p.name == "self":
                continue
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise TypeError(f"{cls.__name__}.__init__ must list its parameters explicitly")
            names.append(p.name)
        return names

    @classmethod
    def default_params(cls) -> dict[str, Any]:
        sig = inspect.signature(cls.__init__)
        return {
            p.name: p.default
            for p in sig.parameters.values()
            if p.name != "self" and p.default is not inspect.Parameter.empty
        }

    @classmethod
    def check_params(cls, params: Iterable[str]) -> None:
        """Refuse parameter names this decoder does not take (``params``: names, or a mapping of
        them): one error naming them and listing the valid ones. :meth:`set_params`,
        :meth:`for_subjects`, :func:`~brainrecon.decoders.get_decoder` and the fit workflow
        all check here.

        Raises
        ------
        BrainreconError
            Some name is not a parameter of ``__init__``.
        """
        valid = cls._param_names()
        unknown = [k for k in params if k not in valid]
        if unknown:
            raise BrainreconError(
                f"Unknown parameter(s) {', '.join(map(repr, unknown))} for decoder {cls.name or cls.__name__!r}. "
                f"Valid parameters: {', '.join(map(repr, valid))}."
            )

    @classmethod
    def for_subjects(cls, subjects: Iterable[int], **params: Any) -> "Decoder":
        """A decoder of ``subjects`` with ``params``, built with the subject keyword the class
        takes: ``subjects=[...]`` when :attr:`multi_subject`, else ``subject=s``.

        Parameters
        ----------
        subjects : sequence of int
            The subjects to fit; exactly one for a single-subject decoder.
        **params
            Any other parameters (checked by :meth:`check_params`).

        Raises
        ------
        BrainreconError
            An unknown parameter, ``subject``/``subjects`` among ``params``, or several (or no)
            subjects for a single-subject decoder.
        """
        subjects = [int(s) for s in subjects]
        given = [k for k in ("subject", "subjects") if k in params]
        if given:
            raise BrainreconError(f"Parameter {given[0]!r} is set from the subjects to fit; give those as subjects.",
                                  parameters=("subjects",))
        cls.check_params(params)
        if cls.multi_subject:
            return cls(**params, subjects=subjects)
        if len(subjects) != 1:
            raise BrainreconError(
                f"Decoder {cls.name or cls.__name__!r} is fitted on one subject at a time, got subjects {subjects}: "
                f"build one decoder per subject."
            )
        return cls(**params, subject=subjects[0])

    def get_params(self) -> dict[str, Any]:
        """The constructor parameters, as given."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> "Decoder":
        self.check_params(params)
        for key, value in params.items():
            setattr(self, key, value)
        return self

    def __repr__(self) -> str:
        defaults = self.default_params()
        shown = [
            f"{k}={v!r}" for k, v in self.get_params().items() if k not in defaults or defaults[k] != v
        ]
        return f"{type(self).__name__}({', '.join(shown)})"

    # ------------------------------------------------------------------ the interface
    @abc.abstractmethod
    def fit(self, train) -> "Decoder":
        """Fit on a training :class:`~brainrecon.data.Split`; return ``self``."""

    @abc.abstractmethod
    def predict(self, test) -> dict[int, np.ndarray]:
        """Predict for every fitted subject present in ``test``.

        Returns
        -------
        dict
            ``subject -> array`` aligned with ``test.ids(subject)``: float32 of shape
            ``(n, *target_shape)`` when :attr:`predicts` is ``"target"``, uint8 of shape
            ``(n, H, W, 3)`` when it is ``"images"``.
        """

    @abc.abstractmethod
    def _save_weights(self, directory: Path) -> dict[str, Any]:
        """Write weight files into ``directory``; return JSON-able state for ``brainrecon.json``."""

    @abc.abstractmethod
    def _load_weights(self, directory: Path, state: dict[str, Any]) -> None:
        """Restore fitted state from ``directory`` and the ``state`` returned by :meth:`_save_weights`."""

    def for_subject(self, subject: int) -> "Decoder":
        """The part of a fitted multi-subject decoder that decodes ``subject`` (saved as its run)."""
        if not self.multi_subject:
            self._check_fitted()
            if int(subject) not in self.subjects_:
                raise DataError(f"This {self.name} decoder was fitted on subject(s) {self.subjects_}, not {subject}.")
            return self
        raise NotImplementedError(f"{type(self).__name__} must implement for_subject()")

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Save the fitted decoder to ``directory`` (created atomically).

        Raises
        ------
        FileExistsError-like BrainreconError
            If ``directory`` exists and ``overwrite`` is false.
        """
        self._check_fitted()
        directory = Path(directory)
        if directory.exists() and not overwrite:
            raise BrainreconError(f"{directory} already exists; pass overwrite=True to replace it.",
                                  parameters=("overwrite",))
        with atomic_directory(directory, overwrite=overwrite) as tmp:
            state = self._save_weights(tmp)
            write_json_atomic(
                tmp / CONFIG_FILE,
                {
                    "decoder": self.name,
                    "format_version": self.format_version,
                    "brainrecon_version": __version__,
                    "params": jsonable(self.get_params()),
                    "subjects": [int(s) for s in self.subjects_],
                    "n_voxels": {str(k): int(v) for k, v in self.n_voxels_.items()},
                    "state": state,
                },
            )
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Decoder":
        """Load a decoder saved by :meth:`save`.

        Called on :class:`Decoder` itself, the class is looked up in the registry by the
        name stored in ``brainrecon.json``.
        """
        directory = Path(directory)
        restore_directory(directory)  # a save(overwrite=True) killed mid-swap left the old one aside
        config_path = directory / CONFIG_FILE
        if not config_path.is_file():
            raise BrainreconError(
                f"{directory} is not a saved brainrecon decoder: {CONFIG_FILE} is missing."
            )
        fix = "the saved decoder is damaged: refit it, or copy it again from where it was made"
        config = read_json(
            config_path, required=("decoder", "format_version", "subjects", "n_voxels"), fix=fix,
            types={"decoder": str, "format_version": int, "subjects": list, "n_voxels": dict,
                   "params": dict, "state": dict},
        )
        name = config.get("decoder")
        if cls is Decoder or not cls.name:
            from brainrecon.decoders import get_decoder_class

            target_cls = get_decoder_class(name)
        else:
            target_cls = cls
            if name != cls.name:
                raise BrainreconError(
                    f"{directory} holds a {name!r} decoder, not {cls.name!r}; "
                    f"load it with brainrecon.decoders.load_decoder()."
                )
        version = config.get("format_version")
        if version != target_cls.format_version:
            raise BrainreconError(
                f"{config_path} has format version {version}, but this brainrecon "
                f"({__version__}) reads format version {target_cls.format_version} of the "
                f"{name!r} decoder; refit, or load it with the brainrecon version that saved it "
                f"({config.get('brainrecon_version')})."
            )
        params = config.get("params", {})
        unknown = set(params) - set(target_cls._param_names())
        if unknown:
            raise BrainreconError(
                f"{config_path} has parameters this brainrecon does not know: {sorted(unknown)}."
            )
        try:
            decoder = target_cls(**params)
            decoder.subjects_ = [int(s) for s in config["subjects"]]
            decoder.n_voxels_ = {int(k): int(v) for k, v in config["n_voxels"].items()}
        except BrainreconError as exc:  # a parameter value the decoder refuses
            raise BrainreconError(f"{config_path}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise BrainreconError(f"{config_path} holds values of the wrong kind ({exc}); {fix}.") from None
        if sorted(decoder.n_voxels_) != sorted(decoder.subjects_):
            raise BrainreconError(
                f"{config_path}: 'n_voxels' names subject(s) {sorted(decoder.n_voxels_)} but 'subjects' is "
                f"{decoder.subjects_}; {fix}."
            )
        try:
            decoder._load_weights(directory, config.get("state", {}))
        except BrainreconError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            # A field of 'state' missing or of the wrong kind: the decoder-specific readers check
            # the weight files themselves, this names a damaged configuration.
            what = f"field {exc.args[0]!r} is missing" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
            raise BrainreconError(f"{config_path}: the saved decoder's state is damaged ({what}); {fix}.") from None
        return decoder

    # ------------------------------------------------------------------ helpers for subclasses
    def _is_fitted(self) -> bool:
        return hasattr(self, "subjects_")

    def _check_fitted(self) -> None:
        if not self._is_fitted():
            raise NotFittedError(
                f"This {type(self).__name__} is not fitted yet; call fit(train) before "
                f"predict() or save()."
            )

    def _check_voxels(self, X: np.ndarray, subject: int) -> None:
        """Raise a :class:`DataError` naming both counts when ``X`` has the wrong width."""
        expected = self.n_voxels_.get(int(subject))
        if expected is None:
            raise DataError(
                f"This {self.name} decoder was fitted on subject(s) {self.subjects_}, "
                f"not on subject {subject}."
            )
        if X.ndim != 2 or X.shape[1] != expected:
            got = X.shape[1] if X.ndim == 2 else X.shape
            raise DataError(
                f"Subject {subject}: the decoder was fitted on {expected} voxels but got {got} "
                f"voxels; use data prepared with the same ROI mask as the training data."
            )

    def _predict_subjects(self, test) -> list[int]:
        """The fitted subjects present in ``test`` (error if there are none)."""
        self._check_fitted()
        subjects = [s for s in self.subjects_ if s in test.subjects]
        if not subjects:
            raise DataError(
                f"The test data has subject(s) {test.subjects}, but this {self.name} decoder "
                f"was fitted on subject(s) {self.subjects_}."
            )
        return subjects
