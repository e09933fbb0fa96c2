"""User-facing errors: one clear line and a non-zero exit, never a traceback for a user mistake."""

from __future__ import annotations

import sys
from typing import Callable, NoReturn, TypeVar

T = TypeVar("T")

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake the user can fix (bad name, missing data, bad shape, NaN loss...).

    `run_cli` prints `error: <message>` on one line and exits with status 2.
    """


def fail(message: str) -> NoReturn:
    """Raise a `UserError` with `message` (one line, says what to do)."""
    raise UserError(message)


def run_cli(main: Callable[[T], object], config_type: type[T]) -> None:
    """Parse `config_type` with tyro, run `main(config)`, turn `UserError` into one line + exit 2.

    With `--resume RUN`, the flags are parsed on top of the resumed run's saved config (`cli_config`).
    tyro itself already exits with status 2 and a short message for flags of the wrong type.
    """
    from common.runs import cli_config

    try:
        config = cli_config(config_type, sys.argv[1:])
        main(config)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("\ninterrupted: resume with --resume <run dir> (progress since the last checkpoint is lost)",
              file=sys.stderr, flush=True)
        sys.exit(130)
