"""Errors a user can act on: one family, rooted in :class:`RefilledError`, a ``ValueError``.

The CLI prints their message (no traceback) and exits with status 2; from Python,
``except ValueError`` (or ``except refilled.RefilledError``) catches every one of them.
"""


class RefilledError(ValueError):
    """Bad input from the user: the message names the problem and what to do about it."""


UserError = RefilledError  # the name used inside refilled


class ConfigError(RefilledError):
    """An unknown key, a wrong type or an invalid value in a configuration or a keyword."""


class DataError(RefilledError):
    """Training or validation data that cannot train what was asked (labels, shapes, values)."""


class DatasetNotFoundError(RefilledError):
    """A dataset is missing or malformed on disk."""


class RunDirError(RefilledError):
    """A run directory that holds a run made by other inputs, or that cannot be used."""


class TrainingDiverged(RefilledError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""
