"""Real prompt sets: JSONL or Parquet rows {"prompt": str, "answer": str}, validated row by row.

A bad row raises a ValueError naming the file and line (JSONL) or row (Parquet): a data set
is used whole or not at all, so nothing is silently lost.
"""
import json
import os
from collections.abc import Iterator
from typing import Any

import grain

from minirl_jax import errors

REQUIRED_FIELDS = ("prompt", "answer")
OPTIONAL_FIELDS = ("solution",)  # a worked completion, needed only for SFT


def load_records(path: str) -> list[dict[str, str]]:
  """Reads and validates every row of a `.jsonl` or `.parquet` file.

  Args:
    path: the file; its extension picks the format.

  Returns:
    One dict per row with "prompt", "answer" and, when the file has it, "solution".
  """
  if not os.path.isfile(path):
    raise errors.MissingPath(f"no prompt file at {path}")
  if path.endswith(".jsonl"):
    rows = _jsonl_rows(path)
    where = "line"
  elif path.endswith(".parquet"):
    rows = _parquet_rows(path)
    where = "row"
  else:
    raise errors.UserError(f"{path}: unknown prompt file format; use .jsonl or .parquet")
  records = [{**_validated(row, f"{path}: {where} {number}"), "where": f"{path}: {where} {number}"}
             for number, row in rows]
  if not records:
    raise errors.UserError(f"{path}: no rows")
  return records


def prompt_dataset(path: str) -> grain.MapDataset:
  """A grain MapDataset of the validated records of `path` (see `load_records`)."""
  return grain.MapDataset.source(load_records(path))


def _jsonl_rows(path: str) -> Iterator[tuple[int, Any]]:
  """(1-based line number, parsed object) for each non-blank line."""
  with open(path, "rb") as f:
    for number, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise errors.UserError(f"{path}: line {number}: not UTF-8 ({e.reason} at byte "
                               f"{e.start} of the line)") from None
      if not line.strip():
        continue
      try:
        yield number, json.loads(line)
      except json.JSONDecodeError as e:
        raise errors.UserError(f"{path}: line {number}: invalid JSON: {e}") from None


def _parquet_rows(path: str) -> Iterator[tuple[int, Any]]:
  """(1-based row number, row dict) for each row."""
  try:
    import pyarrow.parquet as pq
  except ImportError as e:
    raise ImportError(f"reading {path} needs pyarrow: pip install 'minirl_jax[parquet]' "
                      "(or pip install pyarrow), or convert it to JSONL") from e
  table = pq.read_table(path)
  missing = [f for f in REQUIRED_FIELDS if f not in table.column_names]
  if missing:
    raise errors.UserError(f"{path}: missing column(s) {missing}; columns are {table.column_names}")
  columns = [f for f in REQUIRED_FIELDS + OPTIONAL_FIELDS if f in table.column_names]
  yield from enumerate(table.select(columns).to_pylist(), start=1)


def _validated(row: Any, where: str) -> dict[str, str]:
  """The record of one row; raises naming `where` if a field is missing, not a string or empty."""
  if not isinstance(row, dict):
    raise errors.UserError(f"{where}: expected an object with {list(REQUIRED_FIELDS)}, "
                           f"got {type(row).__name__}")
  record = {}
  for field in REQUIRED_FIELDS + OPTIONAL_FIELDS:
    if field not in row and field in OPTIONAL_FIELDS:
      continue
    value = row.get(field)
    if not isinstance(value, str):
      raise errors.UserError(f"{where}: field {field!r} must be a string, got {repr(value)[:80]} "
                             "(write numeric answers as strings, e.g. \"42\")")
    if not value.strip():
      raise errors.UserError(f"{where}: field {field!r} is empty")
    record[field] = value
  return record
