"""The project's two deliberate ways to stop, and how scripts report them.

`UserError`: the input is wrong (a config field, a data file and line, a path). Scripts print
`error: <message>` without a traceback and exit with status 2.

`RunStopped`: a run stopped on purpose after saving what it had (non-finite updates in a row,
failing reward function, SIGTERM/SIGINT). Scripts print `stopped: <message>` and exit with
the stop's status. Every other exception is a bug and keeps its traceback.
"""
import sys
from typing import Callable

USER_ERROR_STATUS = 2
STOPPED_STATUS = 3


class UserError(ValueError):
  """Bad input, named by field, file and 1-based line where it has them."""


class MissingPath(UserError, FileNotFoundError):
  """A file or directory the input names does not exist (still a FileNotFoundError)."""


class RunStopped(Exception):
  """A run stopped on purpose; `status` is the exit status its script returns."""

  def __init__(self, message: str, status: int = STOPPED_STATUS):
    super().__init__(message)
    self.status = status


def reporting(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
  """Wraps an absl `main`: user errors and stops become one line and an exit status."""

  def wrapped(argv):
    try:
      return main(argv)
    except UserError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(USER_ERROR_STATUS)
    except RunStopped as e:
      print(f"stopped: {e}", file=sys.stderr)
      sys.exit(e.status)

  return wrapped
