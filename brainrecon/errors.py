"""Exceptions raised for problems a user can fix.

The CLI prints a :class:`BrainreconError` as one red line and exits with code 1;
anything else is a bug and shows its traceback.

Library messages speak of function parameters (``pass overwrite=True``), never of command-line
flags: an error names the parameters it refers to in ``parameters``, and the CLI adds the
flag that sets each one (``--overwrite``), so the same error reads right from Python and from
the shell. Warnings do the same through :class:`BrainreconWarning`. A whole command the user is
told to run is quoted in backticks (`` `brainrecon prepare-nsd --subject N --out DIR` ``) and
may keep its flags: it names another command, not an option of the one that ran.
"""

from __future__ import annotations


class BrainreconError(Exception):
    """A problem with the user's input, data, weights or files; the message says how to fix it.

    ``parameters``: names of the function parameters the message refers to (the CLI adds the
    flag of each).
    """

    def __init__(self, *args, parameters: tuple[str, ...] | list[str] = ()):
        super().__init__(*args)
        self.parameters = tuple(parameters)


class DataError(BrainreconError, ValueError):
    """Data that cannot be used as given (shapes, counts, non-finite values, missing files)."""


class NotFittedError(BrainreconError, RuntimeError):
    """A decoder or estimator was used before ``fit``."""


class WeightsNotFoundError(BrainreconError, FileNotFoundError):
    """Model weights are not present locally and cannot be downloaded."""


class BrainreconWarning(UserWarning):
    """A warning for the user; like :class:`BrainreconError`, it lists in ``parameters`` the
    function parameters its message refers to (the CLI adds the flag of each).

    Warn with an instance to give them: ``warnings.warn(BrainreconWarning(message,
    parameters=("resume",)), stacklevel=2)``.
    """

    def __init__(self, *args, parameters: tuple[str, ...] | list[str] = ()):
        super().__init__(*args)
        self.parameters = tuple(parameters)


class DamagedCacheWarning(BrainreconWarning):
    """A cache was found damaged (truncated or inconsistent files) and is being recomputed."""
