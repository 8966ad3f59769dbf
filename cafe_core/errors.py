"""The two kinds of failure every entry point reports, and the exit status of each.

A stage's own errors subclass one of these, so the command line and the pipeline's components map them the
same way without knowing every module's exceptions (and without importing the modules that define them):

- `BadInput` (exit 2): the configuration, the data, a checkpoint or the storage cannot be used as given; the
  message names the record or key and the fix.
- `StageFailed` (exit 1): the stage ran on usable input and its result is a failure (reject limit exceeded,
  hard validation check failed, gate FAIL, promotion refused, training job failed).
"""

from __future__ import annotations

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2


class CafeError(Exception):
    exit_code = EXIT_FAILED
    label = "FAILED"


class BadInput(CafeError):
    """Input the user can fix; the message says which record or key and how."""

    exit_code = EXIT_BAD_INPUT
    label = "error"


class StageFailed(CafeError):
    """The stage ran and its result is a failure."""

    exit_code = EXIT_FAILED
    label = "FAILED"


def exit_line(error: CafeError) -> str:
    """The one line a failed command or step ends with (the same in both)."""
    return f"{error.label}: {error}"
