"""Tests for minirl_jax.data.hf_tokenizer (a tiny tokenizer trained here; nothing downloaded)."""
import sys

import numpy as np
import pytest

from minirl_jax.data import hf_tokenizer
from minirl_jax.data import pipeline

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2


def _train_tokenizer(specials=SPECIALS):
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=specials, show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["What is 1+1?", hf_tokenizer.MATH_INSTRUCTION, "user assistant system"],
                          trainer)
  return tok


@pytest.fixture
def tokenizer_dir(tmp_path):
  _train_tokenizer().save(str(tmp_path / "tokenizer.json"))
  return tmp_path


def test_math_chat_prompt_is_the_qwen3_template():
  assert hf_tokenizer.math_chat_prompt("What is 1+1?") == (
      "<|im_start|>user\nWhat is 1+1?\n"
      "Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
      "<|im_start|>assistant\n")
  assert hf_tokenizer.math_chat_prompt("Q", system="Be brief.").startswith(
      "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ\n")


def test_loads_from_directory_or_file_with_qwen3_special_ids(tokenizer_dir):
  for path in (str(tokenizer_dir), str(tokenizer_dir / "tokenizer.json")):
    tok = hf_tokenizer.load_hf_tokenizer(path)
    assert (tok.pad_id, tok.eos_id, tok.eos_ids, tok.bos_id) == (0, 2, (2, 0), None)
    assert tok.vocab_size == 300


def test_encode_maps_written_special_tokens_and_decode_drops_them(tokenizer_dir):
  tok = hf_tokenizer.load_hf_tokenizer(str(tokenizer_dir))
  ids = tok.encode(hf_tokenizer.math_chat_prompt("What is 2+2?"))
  assert ids[0] == 1 and ids.count(1) == 2 and ids.count(2) == 1  # two <|im_start|>, one <|im_end|>
  assert tok.decode(ids) == "user\nWhat is 2+2?\n" + hf_tokenizer.MATH_INSTRUCTION + "\nassistant\n"
  assert tok.decode(tok.encode("x = 3/4, done.")) == "x = 3/4, done."
  assert tok.decode(np.array(tok.encode("ok"))) == "ok"


def test_prompts_and_sft_targets_through_the_pipeline(tokenizer_dir):
  tok = hf_tokenizer.load_hf_tokenizer(str(tokenizer_dir))
  records = [{"prompt": "What is 1+1?", "answer": "2", "solution": "1+1=2, so \\boxed{2}."}]
  formatted = tok.encode(hf_tokenizer.math_chat_prompt(records[0]["prompt"]))
  width = len(formatted) + 3
  batch = next(iter(pipeline.rl_prompt_dataset(
      records, tok, global_batch_size=1, max_prompt_len=width, seed=0,
      format_prompt=hf_tokenizer.math_chat_prompt, shard_index=0, shard_count=1)))
  np.testing.assert_array_equal(batch["prompt_tokens"][0], [0, 0, 0] + formatted)
  sft = next(iter(pipeline.sft_dataset(
      records, tok, global_batch_size=1, max_prompt_len=width, max_len=width + 40, seed=0,
      format_prompt=hf_tokenizer.math_chat_prompt, shard_index=0, shard_count=1)))
  target = tok.encode(records[0]["solution"]) + [2]  # ends with <|im_end|>
  np.testing.assert_array_equal(sft["tokens"][0, width:width + len(target)], target)
  assert sft["loss_mask"][0].sum() == len(target)


def test_missing_special_token_or_file_or_package_raise_clearly(tmp_path, monkeypatch):
  _train_tokenizer(specials=["<|endoftext|>"]).save(str(tmp_path / "tokenizer.json"))
  with pytest.raises(ValueError, match=r"no token '<\|im_end\|>'"):
    hf_tokenizer.load_hf_tokenizer(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    hf_tokenizer.load_hf_tokenizer(str(tmp_path / "absent"))
  monkeypatch.setitem(sys.modules, "tokenizers", None)
  with pytest.raises(ImportError, match=r"minirl_jax\[hf\]"):
    hf_tokenizer.load_hf_tokenizer(str(tmp_path))
