"""Config sections (mappings, e.g. a ConfigDict section) into frozen, validating dataclasses.

The one place that turns a section into a dataclass and the one way a field reports that it
is invalid: every error names the field as the user writes it (`rl.mini_batch_size ...`).
"""
import dataclasses
from typing import Any, Mapping

from minirl_jax import errors


def fail(field: str, message: str):
  """Raises the error every config check uses: `"{field} {message}"`."""
  raise errors.UserError(f"{field} {message}")


def build(cls, values: Mapping[str, Any], name: str, **extra):
  """Builds dataclass `cls` from the section `name`, naming unknown keys; lists become
  tuples so the result stays hashable (configs are static jit arguments)."""
  values = dict(values)
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    fail(name, f"has unknown fields {unknown}; known: {sorted(known)}")
  values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
  return cls(**values, **extra)
