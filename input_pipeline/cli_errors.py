"""How the data command-line tools (`input_pipeline.build`, `input_pipeline.train_tokenizer`)
report errors a user can fix: one line, `error: ...`, and exit status 1, no traceback.

    with cli_errors.exit_on_user_error():
        builder = pipeline.build_dataset(config.data)

The messages already name what was wrong: the config field, the file and CSV line, and,
for a build stopped by too many bad rows (`builder_common.BadDataError`), the build
report's path. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import csv
from collections.abc import Iterator


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean bad input, not a bug: a wrong config or flag
    (ValueError, KeyError; AttributeError is config_lib's "no get_config"), missing or
    unreadable files (OSError), a malformed CSV, too many bad rows."""
    from input_pipeline.builder_common import BadDataError

    return (BadDataError, ValueError, KeyError, AttributeError, OSError, csv.Error)


def error_line(error: BaseException) -> str:
    """`error: <message>` on one line (a multi-line message's lines joined by spaces)."""
    # str(KeyError("x")) is "'x'": the message is its argument.
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    text = " ".join(str(message).split())
    return f"error: {text or type(error).__name__}"


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Turns a `user_errors()` exception raised inside into SystemExit(error_line(e))."""
    try:
        yield
    except user_errors() as e:
        raise SystemExit(error_line(e)) from None
