"""Errors that the CLI and operators report as one clear line."""


class InputError(ValueError):
    """Bad input from the user: a bad parameter, a missing or corrupt file, an unusable model."""


def add_note(error: BaseException, note: str) -> None:
    """`error.add_note(note)`: printed under the traceback (Python 3.11+; kept in `__notes__` on 3.10)."""
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:
        error.__notes__ = [*getattr(error, "__notes__", []), note]
