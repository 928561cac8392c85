"""Rewards for tests, importable by name (`data.reward`) from reward worker processes."""


def odd_length(prompt, completion, answer):
  """A reward an untrained model earns about half the time: its advantages are not 0."""
  del prompt, answer
  return float(len(completion) % 2)
