"""Config sections <-> frozen, validating dataclasses.

A section's keys and defaults are its dataclass's fields (`to_config`), and `build` turns a
section back into the dataclass: the one place either happens, and the one way a field
reports that it is invalid: every error names the field as the user writes it
(`rl.mini_batch_size ...`). A field whose value selects behaviour is a `Choice`.
"""
import dataclasses
import enum
import types
import typing
from typing import Any, Mapping

import ml_collections
from ml_collections import config_dict

from minirl_jax import errors


def fail(field: str, message: str):
  """Raises the error every config check uses: `"{field} {message}"`."""
  raise errors.UserError(f"{field} {message}")


class Choice(enum.StrEnum):
  """The values of a config field that selects behaviour (`rl.routing_replay`, ...).

  Members equal their strings (`RoutingReplay.R3 == "r3"`, same hash), so configs, flags,
  JSON and dict lookups keep plain strings; a dataclass field holds the member.
  """

  def __repr__(self) -> str:
    return repr(self.value)  # messages quote the value as the user writes it

  @classmethod
  def values(cls) -> tuple[str, ...]:
    return tuple(member.value for member in cls)

  @classmethod
  def parse(cls, value, field: str) -> "Choice":
    """`value` as a member; anything else fails naming `field` and the allowed values."""
    try:
      return cls(value)
    except (ValueError, TypeError):
      fail(field, f"must be one of {cls.values()}, got {value!r}")


def set_choice(obj, attribute: str, cls: type[Choice], field: str) -> None:
  """Replaces a frozen dataclass's string `attribute` by its `cls` member (`Choice.parse`)."""
  object.__setattr__(obj, attribute, cls.parse(getattr(obj, attribute), field))


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


def to_config(cls, exclude: tuple[str, ...] = (), **overrides) -> ml_collections.ConfigDict:
  """A config section of dataclass `cls`: every field but `exclude`, at its default or in
  `overrides` (the embedded default run's own values, stated where it differs). A field
  that defaults to None is a typed placeholder, so `--config.section.field=...` parses."""
  unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
  if unknown:
    raise TypeError(f"{cls.__name__} has no fields {unknown}")
  section = {}
  for f in dataclasses.fields(cls):
    if f.name in exclude:
      continue
    if f.name in overrides:
      value = overrides[f.name]
    elif f.default is not dataclasses.MISSING:
      value = f.default
    elif f.default_factory is not dataclasses.MISSING:
      value = f.default_factory()
    else:
      raise TypeError(f"{cls.__name__}.{f.name} has no default")
    if isinstance(value, Choice):
      value = value.value  # a plain string: `--config.x.y=...` overrides it
    section[f.name] = config_dict.placeholder(_optional_of(f.type)) if value is None else value
  return ml_collections.ConfigDict(section)


def _optional_of(annotation):
  """T of `Optional[T]` (or `T | None`); a parametrised T by its origin (tuple[int, ...]
  -> tuple)."""
  args = [a for a in typing.get_args(annotation) if a is not type(None)]
  if typing.get_origin(annotation) not in (typing.Union, types.UnionType) or len(args) != 1:
    raise TypeError(f"a field defaulting to None must be Optional[T], not {annotation}")
  return typing.get_origin(args[0]) or args[0]
