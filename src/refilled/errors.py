"""Errors a user can act on. The CLI prints their message (no traceback) and exits with status 2."""


class UserError(Exception):
    """Bad input from the user: the message names the problem and what to do about it."""


class ConfigError(UserError):
    """An unknown key, a wrong type or an invalid value in a configuration."""


class DatasetNotFoundError(UserError):
    """A dataset is missing or malformed on disk."""
