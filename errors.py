"""Errors that the CLI and operators report as one clear line."""


class InputError(ValueError):
    """Bad input from the user: a bad parameter, a missing or corrupt file, an unusable model."""
