"""Tests for minirl_jax.data.sources."""
import json
import sys

import grain
import pytest

from minirl_jax import errors
from minirl_jax.data import pipeline
from minirl_jax.data import sources
from minirl_jax.data import tokenizer


def _write_jsonl(path, lines):
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return str(path)


def test_jsonl_rows_become_records(tmp_path):
  path = _write_jsonl(tmp_path / "p.jsonl", [
      json.dumps({"prompt": "What is 1+1?", "answer": "2", "source": "ignored"}),
      "",
      json.dumps({"prompt": "Half of 3?", "answer": "\\frac{3}{2}",
                  "solution": "3/2 \\boxed{\\frac{3}{2}}"}),
  ])
  assert sources.load_records(path) == [  # each record names its file and 1-based line
      {"prompt": "What is 1+1?", "answer": "2", "where": f"{path}: line 1"},
      {"prompt": "Half of 3?", "answer": "\\frac{3}{2}", "solution": "3/2 \\boxed{\\frac{3}{2}}",
       "where": f"{path}: line 3"},
  ]


def test_prompt_dataset_is_a_grain_map_dataset(tmp_path):
  path = _write_jsonl(tmp_path / "p.jsonl",
                      [json.dumps({"prompt": f"q{i}", "answer": str(i)}) for i in range(3)])
  dataset = sources.prompt_dataset(path)
  assert isinstance(dataset, grain.MapDataset)
  assert len(dataset) == 3
  assert dataset[2] == {"prompt": "q2", "answer": "2", "where": f"{path}: line 3"}


@pytest.mark.parametrize("bad_line, message", [
    ('{"prompt": "q", "answer": ', r"line 3: invalid JSON"),
    ('{"prompt": "q"}', r"line 3: field 'answer' must be a string, got None"),
    ('{"prompt": "q", "answer": 42}', r"line 3: field 'answer' must be a string, got 42 .*\"42\""),
    ('{"prompt": "  ", "answer": "1"}', r"line 3: field 'prompt' is empty"),
    ('{"prompt": "q", "answer": "1", "solution": null}',
     r"line 3: field 'solution' must be a string"),
    ('["q", "1"]', r"line 3: expected an object"),
])
def test_bad_jsonl_row_raises_naming_file_and_line(tmp_path, bad_line, message):
  good = json.dumps({"prompt": "q", "answer": "1"})
  path = _write_jsonl(tmp_path / "bad.jsonl", [good, good, bad_line, good])
  with pytest.raises(ValueError, match=message) as error:
    sources.load_records(path)
  assert str(error.value).startswith(f"{path}: ")


def test_non_utf8_line_and_too_long_prompt_name_file_and_line(tmp_path):
  path = tmp_path / "latin1.jsonl"
  good = json.dumps({"prompt": "1+2=", "answer": "3"}).encode()
  path.write_bytes(good + b"\n" + '{"prompt": "caf\u00e9", "answer": "1"}'.encode("latin-1")
                   + b"\n")
  with pytest.raises(errors.UserError, match=r"latin1.jsonl: line 2: not UTF-8"):
    sources.load_records(str(path))
  long = _write_jsonl(tmp_path / "long.jsonl",
                      [good.decode(), good.decode(),
                       json.dumps({"prompt": "1234+5678=", "answer": "1"})])
  records = sources.load_records(long)
  with pytest.raises(errors.UserError, match=rf"{long}: line 3: prompt has 10 tokens > "
                     r"data.max_prompt_len 6"):
    pipeline.check_prompt_lengths(records, tokenizer.CharTokenizer(), 6)


def test_empty_missing_and_unknown_files_raise(tmp_path):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n", encoding="utf-8")
  with pytest.raises(ValueError, match="no rows"):
    sources.load_records(str(empty))
  with pytest.raises(FileNotFoundError):
    sources.load_records(str(tmp_path / "absent.jsonl"))
  csv = tmp_path / "p.csv"
  csv.write_text("prompt,answer\n", encoding="utf-8")
  with pytest.raises(ValueError, match="use .jsonl or .parquet"):
    sources.load_records(str(csv))


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
  path = tmp_path / "p.parquet"
  path.write_bytes(b"PAR1")
  monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow...` fail
  monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
  with pytest.raises(ImportError, match=r"minirl_jax\[parquet\]"):
    sources.load_records(str(path))


def test_parquet_rows_become_records(tmp_path):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  path = str(tmp_path / "p.parquet")
  pq.write_table(pa.table({"prompt": ["a?", "b?"], "answer": ["1", "2"], "extra": [0, 1]}), path)
  assert sources.load_records(path) == [
      {"prompt": "a?", "answer": "1", "where": f"{path}: row 1"},
      {"prompt": "b?", "answer": "2", "where": f"{path}: row 2"}]


def test_bad_parquet_rows_raise_naming_the_row(tmp_path):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  path = str(tmp_path / "p.parquet")
  pq.write_table(pa.table({"prompt": ["a?", "b?"], "answer": ["1", None]}), path)
  with pytest.raises(ValueError, match=r"row 2: field 'answer' must be a string"):
    sources.load_records(path)
  pq.write_table(pa.table({"question": ["a?"], "answer": ["1"]}), path)
  with pytest.raises(ValueError, match=r"missing column\(s\) \['prompt'\]"):
    sources.load_records(path)
