"""The one error type users see.

Anything the user can fix (a recipe key, a data file, a model path) raises ``UserError`` with a
single line that names the file/key/field and what was expected. ``python -m minidistill.run``
prints it and exits with status 2; library callers can catch it.
"""


class UserError(Exception):
    """A problem in the user's input, explained in one line."""

    exit_code = 2


def named(key: str, load):
    """Call ``load()``; a UserError from it is prefixed with the recipe key that named the input."""
    try:
        return load()
    except UserError as e:
        raise UserError(f"{key}: {e}") from None
