"""Trial planning: which sessions a request means, and which split and row every trial of
those sessions feeds (the recipe of Brain-Diffuser's ``prepare_nsddata.py``, steps 1, 2 and 5
in :mod:`brainrecon.data.nsd`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from brainrecon.data.nsd.release import _DOWNLOAD_HINT, NSD_SESSIONS, TRIALS_PER_SESSION, check_subject
from brainrecon.errors import DataError

#: Sessions in the release before the Algonauts sessions 38-40 were added (982 test images).
OLD_RELEASE_SESSIONS = 37
N_SHARED = 1000
TEST_SETS = (982, 1000)


def resolve_sessions(subject: int, sessions: int | str | None, test_set: int | None) -> tuple[int, str, int]:
    """Turn the user's ``sessions`` / ``test_set`` request into numbers.

    Parameters
    ----------
    subject : int
    sessions : int, "all" or None
        The first K sessions, all of the subject's sessions, or the default: all sessions,
        except with ``test_set=982`` where the default is the first 37 (clipped to what the
        subject has).
    test_set : {982, 1000} or None
        None means 1000 (every shared image shown in the chosen sessions).

    Returns
    -------
    n_sessions : int
    request : str
        What was asked, as recorded in the manifest ("all", "37-or-fewer" or "K").
    test_set : int
    """
    subject = check_subject(subject)
    have = NSD_SESSIONS[subject]
    if test_set is None:
        test_set = 1000
    try:
        test_set = int(test_set)
    except (TypeError, ValueError):
        test_set = -1
    if test_set not in TEST_SETS:
        raise DataError(f"Unknown test set {test_set!r}; valid: 982 (sessions 1-37, the pre-2023 papers' "
                        f"test set) or 1000 (all shared images).")
    if sessions is None:
        if test_set == 982:
            return min(OLD_RELEASE_SESSIONS, have), "37-or-fewer", test_set
        return have, "all", test_set
    if isinstance(sessions, str) and sessions.strip().lower() == "all":
        return have, "all", test_set
    try:
        k = int(sessions)
    except (TypeError, ValueError):
        raise DataError(f"sessions must be a number of sessions or 'all', got {sessions!r}.",
                        parameters=("sessions",)) from None
    if k < 1:
        raise DataError(f"sessions must be at least 1, got {k}.", parameters=("sessions",))
    if k > have:
        raise DataError(
            f"Subject {subject} has {have} NSD sessions (1-{have}); sessions={k} asks for sessions "
            f"up to {k}, which this subject does not have. Use sessions={have} or sessions='all'.",
            parameters=("sessions",)
        )
    return k, str(k), test_set


@dataclass
class TrialPlan:
    """Which split and row each trial of the chosen sessions feeds.

    Attributes
    ----------
    subject, n_sessions, test_set : int
    train_ids, test_ids : int64 arrays of shape (n_train,), (n_test,)
        0-based 73k ids in order of first appearance.
    trial_split : int8 array of shape (n_sessions * 750,)
        0 = train, 1 = test, -1 = dropped (a shared image outside the 982 test set).
    trial_row : int64 array of shape (n_sessions * 750,)
        Row of the trial's image in its split (-1 when dropped).
    n_dropped_shared : int
        Shared images shown in the chosen sessions but outside the test set.
    """

    subject: int
    n_sessions: int
    test_set: int
    train_ids: np.ndarray
    test_ids: np.ndarray
    trial_split: np.ndarray
    trial_row: np.ndarray
    n_dropped_shared: int

    def ids(self, split: str) -> np.ndarray:
        return self.train_ids if split == "train" else self.test_ids

def plan_trials(design: dict[str, np.ndarray], subject: int, n_sessions: int, test_set: int = 1000) -> TrialPlan:
    """Assign every trial of the first ``n_sessions`` sessions to a split and a row.

    Parameters
    ----------
    design : dict
        From :func:`read_design`.
    subject : int
    n_sessions : int
    test_set : {982, 1000}

    Returns
    -------
    TrialPlan
    """
    subject = check_subject(subject)
    mo = design["masterordering"]
    n_trials = n_sessions * TRIALS_PER_SESSION
    if mo.size < n_trials:
        raise DataError(f"nsd_expdesign.mat: masterordering has {mo.size} trials but {n_sessions} sessions "
                        f"need {n_trials}. {_DOWNLOAD_HINT}")
    pos = mo[:n_trials]
    ids = design["subjectim"][subject - 1, pos - 1] - 1
    shared = pos <= N_SHARED
    split = np.where(shared, 1, 0).astype(np.int8)
    n_dropped = 0
    if test_set == 982:
        old_n = OLD_RELEASE_SESSIONS * TRIALS_PER_SESSION
        if mo.size < old_n:
            raise DataError(f"nsd_expdesign.mat: masterordering has {mo.size} trials; the 982 test set needs "
                            f"the first {old_n}. {_DOWNLOAD_HINT}")
        old_pos = np.unique(mo[:old_n][mo[:old_n] <= N_SHARED])
        outside = shared & ~np.isin(pos, old_pos)
        split[outside] = -1
        n_dropped = int(np.unique(pos[outside]).size)
    rows = np.full(n_trials, -1, dtype=np.int64)
    ordered = {}
    for code, name in ((0, "train"), (1, "test")):
        sel = np.flatnonzero(split == code)
        uniq, first, inverse = np.unique(ids[sel], return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")
        rank = np.empty(len(uniq), dtype=np.int64)
        rank[order] = np.arange(len(uniq))
        rows[sel] = rank[inverse.reshape(-1)]
        ordered[name] = uniq[order].astype(np.int64)
    return TrialPlan(subject, n_sessions, test_set, ordered["train"], ordered["test"], split, rows, n_dropped)
