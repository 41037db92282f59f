"""Exceptions raised for problems a user can fix.

The CLI prints a :class:`BrainreconError` as one red line and exits with code 1;
anything else is a bug and shows its traceback.
"""


class BrainreconError(Exception):
    """A problem with the user's input, data, weights or files; the message says how to fix it."""


class DataError(BrainreconError, ValueError):
    """Data that cannot be used as given (shapes, counts, non-finite values, missing files)."""


class NotFittedError(BrainreconError, RuntimeError):
    """A decoder or estimator was used before ``fit``."""


class WeightsNotFoundError(BrainreconError, FileNotFoundError):
    """Model weights are not present locally and cannot be downloaded."""


class DamagedCacheWarning(UserWarning):
    """A cache was found damaged (truncated or inconsistent files) and is being recomputed."""
