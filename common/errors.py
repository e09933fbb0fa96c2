"""User-facing errors: one clear line and a non-zero exit, never a traceback for a user mistake."""

from __future__ import annotations

from typing import NoReturn

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake the user can fix (bad name, missing data, bad shape, NaN loss...).

    `common.runs.run_cli` prints `error: <message>` on one line and exits with status 2.
    """


def fail(message: str) -> NoReturn:
    """Raise a `UserError` with `message` (one line, says what to do)."""
    raise UserError(message)
