"""Exit codes, and the exception bases that carry them.

Every error a user can cause or meet derives from :class:`FcnError` and
carries the exit status its command returns; :func:`fcn_jax.cli.run` maps an
exception to that status by its type alone, so no command keeps its own
``except`` ladder and lower layers need not know the commands exist.

=====  ==================================================================
code   meaning
=====  ==================================================================
0      success
1      a check found a problem (``checkpoint verify``, ``check``)
2      bad input: configuration, data, mesh, a missing or existing file,
       a run locked by another process, an unreadable checkpoint format
3      the training loss became non-finite
4      not enough disk space for a checkpoint
5      a damaged checkpoint or model package (integrity check failed)
6      nothing to verify: ``checkpoint verify`` found no checkpoint or model
       at the path (a run that has not saved yet); not damage
75     a peer process of a multi-process run was lost; the last intact
       checkpoint is kept and rerunning the same command resumes from it
130    interrupted (Ctrl-C)
=====  ==================================================================
"""

from __future__ import annotations

__all__ = ["EXIT_OK", "EXIT_CHECK_FAILED", "EXIT_INPUT", "EXIT_NON_FINITE", "EXIT_NO_SPACE", "EXIT_DAMAGED",
           "EXIT_NOTHING_TO_VERIFY", "EXIT_PEER_LOST", "EXIT_INTERRUPTED", "FcnError", "InputError", "exit_code"]

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_INPUT = 2
EXIT_NON_FINITE = 3
EXIT_NO_SPACE = 4
EXIT_DAMAGED = 5
EXIT_NOTHING_TO_VERIFY = 6
EXIT_PEER_LOST = 75  # sysexits' EX_TEMPFAIL: a scheduler may requeue; the rerun resumes
EXIT_INTERRUPTED = 130


class FcnError(Exception):
    """Base of fcn_jax's own errors; ``exit_code`` is what a command returns when one escapes."""

    exit_code: int = EXIT_INPUT


class InputError(FcnError, ValueError):
    """Something the user gave (a value, file, variable, key or mesh axis) is not usable; the message names it."""

    exit_code = EXIT_INPUT


#: Operating-system errors about a user's paths: a one-line message, exit 2, no traceback.
_PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def exit_code(exc: BaseException) -> int | None:
    """The exit status for ``exc``, or ``None`` when it is not one a command reports in one line (a bug)."""
    if isinstance(exc, FcnError):
        return exc.exit_code
    if isinstance(exc, _PATH_ERRORS):
        return EXIT_INPUT
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return None
