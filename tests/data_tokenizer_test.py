"""Tests for minirl_jax.data.tokenizer."""
import pytest

from minirl_jax.data import tasks
from minirl_jax.data import tokenizer as tokenizer_lib


def test_char_tokenizer_ids_are_fixed():
  tok = tokenizer_lib.CharTokenizer()
  assert (tok.vocab_size, tok.pad_id, tok.eos_id, tok.eos_ids, tok.bos_id) == (21, 0, 1, (1,), None)
  # pad 0, eos 1, digits 2..11, then + - * ( ) = space newline #.
  assert tok.encode("0189") == [2, 3, 10, 11]
  assert tok.encode("+-*()= \n#") == [12, 13, 14, 15, 16, 17, 18, 19, 20]


def test_char_tokenizer_round_trips_worked_solutions():
  tok = tokenizer_lib.CharTokenizer()
  text = "12+7-5=19-5=14 #14\n2*3=6 #6"
  ids = tok.encode(text)
  assert len(ids) == len(text)
  assert tok.decode(ids) == text


def test_char_tokenizer_covers_every_task_character():
  tok = tokenizer_lib.CharTokenizer()
  task = tasks.ArithmeticTask(num_operands=4, operators="+-*")
  for index in range(200):
    problem = task.train_problem(seed=3, index=index)
    text = problem.prompt + problem.solution
    assert tok.decode(tok.encode(text)) == text
    assert max(tok.encode(text)) < tok.vocab_size


def test_char_tokenizer_rejects_unknown_characters_naming_them():
  with pytest.raises(ValueError, match=r"'x' at position 2"):
    tokenizer_lib.CharTokenizer().encode("12x")


def test_decode_drops_pad_and_eos_and_marks_unknown_ids():
  tok = tokenizer_lib.CharTokenizer()
  assert tok.decode([0, 0, 3, 12, 4, 1, 0]) == "1+2"
  assert tok.decode([3, 25, 4]) == "1\ufffd2"


def test_trim_at_eos_stops_at_the_first_stop_id():
  assert tokenizer_lib.trim_at_eos([5, 6, 1, 7, 1], eos_ids=(1,)) == [5, 6]
  assert tokenizer_lib.trim_at_eos([5, 9, 6, 8], eos_ids=(8, 9)) == [5]
  assert tokenizer_lib.trim_at_eos([5, 6], eos_ids=(1,)) == [5, 6]
