"""Tests for minirl_jax.data.pipeline."""
import numpy as np
import pytest

from minirl_jax.data import pipeline
from minirl_jax.data import tasks
from minirl_jax.data import tokenizer as tokenizer_lib

TOK = tokenizer_lib.CharTokenizer()


def _records(n):
  return [{"prompt": f"{i}+1=", "answer": str(i + 1), "solution": f"{i + 1} #{i + 1}"}
          for i in range(n)]


def _rl(records, **kwargs):
  kwargs = dict(global_batch_size=4, max_prompt_len=6, seed=0, shard_index=0,
                shard_count=1) | kwargs
  return pipeline.rl_prompt_dataset(records, TOK, **kwargs)


def _sft(records, **kwargs):
  kwargs = dict(global_batch_size=4, max_prompt_len=6, max_len=12, seed=0, shard_index=0,
                shard_count=1) | kwargs
  return pipeline.sft_dataset(records, TOK, **kwargs)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_left_pad_by_hand():
  tokens, mask = pipeline.left_pad([3, 12, 4, 17], 6, pad_id=0)
  np.testing.assert_array_equal(tokens, [0, 0, 3, 12, 4, 17])
  np.testing.assert_array_equal(mask, [False, False, True, True, True, True])
  assert tokens.dtype == np.int32 and mask.dtype == bool


def test_rl_batch_layout():
  records = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "10+20=", "answer": "30"}]
  batch = next(iter(_rl(records, global_batch_size=2)))
  assert set(batch) == {"prompt_tokens", "prompt_mask", "index", "prompt", "answer"}
  assert batch["prompt_tokens"].shape == (2, 6) and batch["prompt_tokens"].dtype == np.int32
  assert batch["prompt_mask"].dtype == bool
  rows = {int(i): row for row, i in enumerate(batch["index"])}
  np.testing.assert_array_equal(batch["prompt_tokens"][rows[0]], [0, 0, 3, 12, 4, 17])
  np.testing.assert_array_equal(batch["prompt_mask"][rows[0]], [0, 0, 1, 1, 1, 1])
  np.testing.assert_array_equal(batch["prompt_tokens"][rows[1]], [3, 2, 12, 4, 2, 17])
  assert batch["answer"][rows[1]] == "30" and batch["prompt"][rows[0]] == "1+2="


def test_rl_epochs_are_reshuffled_permutations_and_seeded():
  records = _records(8)
  indices = [b["index"].tolist() for b in _take(iter(_rl(records)), 4)]
  first_epoch, second_epoch = indices[0] + indices[1], indices[2] + indices[3]
  assert sorted(first_epoch) == sorted(second_epoch) == list(range(8))
  assert first_epoch != second_epoch
  for batch in _take(iter(_rl(records)), 4):  # every row still carries its own record
    assert ([TOK.decode(t) for t in batch["prompt_tokens"]] ==
            [records[i]["prompt"] for i in batch["index"]])
    assert batch["answer"].tolist() == [records[i]["answer"] for i in batch["index"]]
  assert [b["index"].tolist() for b in _take(iter(_rl(records)), 4)] == indices
  assert [b["index"].tolist() for b in _take(iter(_rl(records, seed=1)), 4)] != indices


def test_rl_shards_are_disjoint_and_split_the_global_batch():
  records = _records(16)
  shards = [_take(iter(_rl(records, shard_index=s, shard_count=2)), 8) for s in (0, 1)]
  assert all(b["prompt_tokens"].shape == (2, 6) for shard in shards for b in shard)
  for epoch in (slice(0, 4), slice(4, 8)):
    seen = [sorted(i for b in shard[epoch] for i in b["index"].tolist()) for shard in shards]
    assert seen == [list(range(0, 16, 2)), list(range(1, 16, 2))]
  with pytest.raises(ValueError, match="not divisible"):
    _rl(records, global_batch_size=5, shard_count=2)


def test_rl_iterator_state_resumes_exactly():
  dataset = _rl(tasks.TrainSource(tasks.ArithmeticTask(), seed=0, size=64), check_lengths=False)
  iterator = iter(dataset)
  _take(iterator, 3)
  state = iterator.get_state()
  expected = _take(iterator, 2)
  restored = iter(_rl(tasks.TrainSource(tasks.ArithmeticTask(), seed=0, size=64),
                      check_lengths=False))
  restored.set_state(state)
  for want, got in zip(expected, _take(restored, 2)):
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])


def test_too_long_prompt_raises_naming_the_record():
  records = _records(5)
  records[3] = {"prompt": "1234+5678=", "answer": "6912"}
  with pytest.raises(ValueError, match=r"record 3 \(0-based\): prompt has 10 tokens > "
                                       r"data.max_prompt_len 6"):
    _rl(records)
  lazy = iter(_rl(records, check_lengths=False, global_batch_size=5))
  with pytest.raises(ValueError, match=r"record 3 \(0-based\): prompt has 10 tokens"):
    next(lazy)


def test_format_prompt_changes_tokens_not_the_reported_prompt():
  records = [{"prompt": "1+2=", "answer": "3"}]
  batch = next(iter(_rl(records, global_batch_size=1, format_prompt=lambda p: "\n" + p)))
  np.testing.assert_array_equal(batch["prompt_tokens"][0], [0, 19, 3, 12, 4, 17])
  assert batch["prompt"][0] == "1+2="


def test_sft_batch_layout_by_hand():
  records = [{"prompt": "1+2=", "answer": "3", "solution": "3 #3"}]
  batch = next(iter(_sft(records, global_batch_size=1, max_prompt_len=5)))
  assert set(batch) == {"tokens", "attn_mask", "loss_mask", "index"}
  # prompt left-padded to 5 | "3 #3" EOS | right pad
  np.testing.assert_array_equal(batch["tokens"][0], [0, 3, 12, 4, 17, 5, 18, 20, 5, 1, 0, 0])
  np.testing.assert_array_equal(batch["attn_mask"][0], [0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(batch["loss_mask"][0], [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0])
  assert batch["tokens"].dtype == np.int32 and batch["loss_mask"].dtype == np.float32


def test_sft_shapes_are_fixed_and_state_resumes_exactly():
  task = tasks.ArithmeticTask()
  max_len = task.max_prompt_chars + task.max_solution_chars + 1
  make = lambda: iter(_sft(tasks.TrainSource(task, seed=2, size=64),
                           max_prompt_len=task.max_prompt_chars, max_len=max_len,
                           global_batch_size=8))
  iterator = make()
  batches = _take(iterator, 3)
  assert all(b["tokens"].shape == b["loss_mask"].shape == (8, max_len) for b in batches)
  state = iterator.get_state()
  expected = _take(iterator, 2)
  restored = make()
  restored.set_state(state)
  for want, got in zip(expected, _take(restored, 2)):
    np.testing.assert_array_equal(want["tokens"], got["tokens"])
    np.testing.assert_array_equal(want["loss_mask"], got["loss_mask"])


def test_sft_rejects_missing_or_too_long_solutions():
  with pytest.raises(ValueError, match=r"record 0 \(0-based\): no 'solution'"):
    _sft([{"prompt": "1+2=", "answer": "3"}])
  with pytest.raises(ValueError, match=r"record 1 \(0-based\): solution has 7 tokens with EOS > "
                                       r"max_len - max_prompt_len = 6"):
    _sft([{"prompt": "1=", "answer": "1", "solution": "1 #1"},
          {"prompt": "1=", "answer": "1", "solution": "11 #11"}])
  with pytest.raises(ValueError, match="must exceed"):
    _sft(_records(4), max_len=6)


def test_eval_is_in_order_padded_and_fixed_shape():
  records = _records(10)
  batches = list(pipeline.eval_prompt_dataset(records, TOK, global_batch_size=4, max_prompt_len=6,
                                              shard_index=0, shard_count=1))
  assert len(batches) == 3 and all(b["prompt_tokens"].shape == (4, 6) for b in batches)
  assert [b["index"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 0]]
  assert [b["valid"].tolist() for b in batches][-1] == [True, True, False, False]
  assert batches[2]["answer"].tolist() == ["9", "10", "1", "1"]


def test_eval_shards_have_equal_batch_counts_and_cover_every_record():
  records = _records(10)
  shards = [list(pipeline.eval_prompt_dataset(records, TOK, global_batch_size=4, max_prompt_len=6,
                                              shard_index=s, shard_count=2)) for s in (0, 1)]
  assert [len(s) for s in shards] == [3, 3]
  valid = sorted(i for s in shards for b in s
                 for i, ok in zip(b["index"].tolist(), b["valid"]) if ok)
  assert valid == list(range(10))
