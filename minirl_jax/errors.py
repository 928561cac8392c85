"""The project's two deliberate ways to stop, and how scripts report them.

`UserError`: the input is wrong (a config field, a data file and line, a path). Scripts print
`error: <message>` without a traceback and exit with status 2.

`RunStopped`: a run stopped on purpose after saving what it had (non-finite updates in a row,
failing reward function, SIGTERM/SIGINT). Scripts print `stopped: <message>` and exit with
the stop's status. Every other exception is a bug and keeps its traceback.

`run(main)` starts a script: the same for flags, so a bad flag or a config override that
names no field (`--config.rl.stepz=5`) is one `error:` line too, naming the nearest field.
"""
import re
import sys
from typing import Callable, Optional, Sequence

from absl import app
from absl import flags

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


def run(main: Callable[[list[str]], None]) -> None:
  """`absl.app.run` for a script: bad flags, user errors and stops print one line."""
  app.run(reporting(main), flags_parser=_parse_flags)


def _parse_flags(argv: Sequence[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # a value that does not parse, an unknown flag
    _exit_with(str(e))
  except (AttributeError, KeyError) as e:  # ml_collections: an override names no field
    message = unknown_field_message(e, argv[1:])
    if message is None:
      raise
    _exit_with(message)


def _exit_with(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(USER_ERROR_STATUS)


def unknown_field_message(error: Exception, args: Sequence[str]) -> Optional[str]:
  """The line for a config override whose path has no such field, or None when `error`
  names no component of any override in `args`.

  ml_collections raises KeyError("'stepz'\nDid you mean \"steps\" ...") (wrapped in an
  AttributeError) for the first unknown component of the path.
  """
  while error.args and isinstance(error.args[0], Exception):
    error = error.args[0]
  text = str(error.args[0]) if error.args else ""
  missing = re.match(r"'([^']+)'", text)
  if not missing:
    return None
  key = missing.group(1)
  suggestion = re.search(r'Did you mean "([^"]+)"', text)
  for arg in args:
    override = re.match(r"--?([A-Za-z_]\w*)\.([\w.]+)(=|$)", arg)
    if not override:
      continue
    flag, path = override.group(1), override.group(2).split(".")
    if key not in path:
      continue
    at = path.index(key)
    where = ".".join(path[:at + 1])
    line = f"--{flag}.{'.'.join(path)}: the config has no field {where}"
    if suggestion:
      nearest = ".".join(path[:at] + [suggestion.group(1)] + path[at + 1:])
      line += f"; did you mean {nearest}?"
    return line
  return None
