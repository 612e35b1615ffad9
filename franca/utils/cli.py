"""The one wrapper that turns a command's bad input into a single error line instead of a traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence

USAGE_ERROR_EXIT = 2
USER_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, ValueError, KeyError)


def error_message(error: BaseException) -> str:
    """``KeyError('x')`` reads ``'x'`` unquoted-twice; other errors read as ``str(error)``."""
    if isinstance(error, KeyError) and error.args:
        return str(error.args[0])
    return str(error)


def run_cli(
    main: Callable[[Sequence[str] | None], int | None],
    *,
    errors: tuple[type[BaseException], ...] = USER_ERRORS,
) -> None:
    """Run ``main(None)`` as a command and exit with its code; an error in ``errors`` prints
    ``error: <message>`` on stderr and exits with status 2."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        code = main(None)
    except errors as error:
        print(f"error: {error_message(error)}", file=sys.stderr)
        sys.exit(USAGE_ERROR_EXIT)
    sys.exit(code or 0)
