"""Errors a user can cause, and how they are reported in one line."""

from __future__ import annotations

#: Errors a user can cause (bad options, configuration, data, run directories, checkpoints, a
#: full disk or a read-only directory): reported as one line, ``sbmt <command>: error: ...``,
#: exit code 2. Set SBMT_TRACEBACK=1 to see the traceback instead.
USER_ERRORS = (ValueError, OSError)


def error_message(err: BaseException) -> str:
    """One line for a user error; an OSError with a file names the file and the reason."""
    if isinstance(err, OSError) and err.strerror and err.filename:
        return f"{err.filename}: {err.strerror}"
    return (str(err) or type(err).__name__).replace("\n", " ")
