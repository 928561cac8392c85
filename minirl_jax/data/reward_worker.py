"""A reward worker: `python -m minirl_jax.data.reward_worker FD` scores the calls that
`scoring.RewardScorer` sends over the connection FD.

A fresh interpreter that imports this module, the reward function's module and the preloads,
never the parent's `__main__`: multiprocessing's spawn re-imports the training script, and
with it JAX, in every worker it starts, which a timeout pays again for each replacement.
"""
import importlib
import math
import numbers
import pickle
import signal
import sys
from multiprocessing import connection
from typing import Optional

_MAX_TEXT = 300  # characters kept of an error message or a bad value's repr


def as_reward(value) -> Optional[float]:
  """`value` as a float if it is a real number in [0, 1], else None.

  Python and NumPy bools count as 1 and 0 (`return pred == answer` is a natural reward);
  None, strings, NaN and numbers outside [0, 1] are not rewards.
  """
  numpy = sys.modules.get("numpy")  # a NumPy bool means NumPy is loaded; never import it here
  if isinstance(value, numbers.Real) or (numpy is not None and isinstance(value, numpy.bool_)):
    value = float(value)
    if math.isfinite(value) and 0.0 <= value <= 1.0:
      return value
  return None


def _clip(text: str) -> str:
  return text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT] + "..."


def describe(e: BaseException) -> str:
  """`Type: message`, the text by which errors are told apart and logged."""
  return _clip(f"{type(e).__name__}: {e}")


def call(reward_fn, prompt: str, completion: str, answer: str) -> tuple[str, object]:
  """("ok", reward) or ("error", what went wrong) for one call."""
  try:
    value = reward_fn(prompt, completion, answer)
    reward = as_reward(value)
    if reward is None:
      return "error", f"returned {_clip(repr(value))}, not a number in [0, 1]"
    return "ok", reward
  except Exception as e:
    return "error", describe(e)


def serve(conn):
  """Sets up from the first message, answers "ready", then scores call lists until None."""
  sys_path, reward_fn_pickle, preload = conn.recv()
  sys.path[:] = sys_path  # the parent's, so reward_fn's module is found as it was there
  try:
    reward_fn = pickle.loads(reward_fn_pickle)
    for module in preload:  # slow imports happen before "ready", outside any call's timeout
      try:
        importlib.import_module(module)
      except ImportError:
        pass
  except Exception as e:
    conn.send(("failed", describe(e)))
    return
  conn.send(("ready", None))
  while (calls := conn.recv()) is not None:
    for index, prompt, completion, answer in calls:
      conn.send((index, *call(reward_fn, prompt, completion, answer)))


def main(argv):
  # Ctrl-C and a cluster's SIGTERM reach every process of the job, and the trainer finishes
  # its step before it stops: a worker ends when the parent kills it or goes away (EOF).
  for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, signal.SIG_IGN)
  with connection.Connection(int(argv[1])) as conn:
    try:
      serve(conn)
    except (EOFError, BrokenPipeError):  # the parent went away
      pass


if __name__ == "__main__":
  main(sys.argv)
