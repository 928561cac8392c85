"""The tokenizer interface every pipeline speaks, the synthetic task's character tokenizer,
and `load`, which picks a run's tokenizer."""
from collections.abc import Sequence
from typing import Optional, Protocol

from minirl_jax.data import hf_tokenizer


class Tokenizer(Protocol):
  """What the pipelines, sampler and rewards need from a tokenizer.

  `eos_ids` lists every id that ends a completion (the sampler stops on any of them);
  `eos_id` is the one appended to SFT targets.
  """
  vocab_size: int
  pad_id: int
  eos_id: int
  eos_ids: tuple[int, ...]
  bos_id: Optional[int]

  def encode(self, text: str) -> list[int]:
    ...

  def decode(self, ids: Sequence[int]) -> str:
    ...


# Order fixes the ids: pad 0, eos 1, then the characters of the synthetic task.
_SPECIAL = ("<pad>", "<eos>")
_CHARS = "0123456789+-*()= \n#"


class CharTokenizer:
  """One token per character of arithmetic text; 21 ids, pad 0, eos 1, no bos."""

  def __init__(self):
    self._id_of = {c: i + len(_SPECIAL) for i, c in enumerate(_CHARS)}
    self._char_of = {i: c for c, i in self._id_of.items()}
    self.vocab_size = len(_SPECIAL) + len(_CHARS)
    self.pad_id = 0
    self.eos_id = 1
    self.eos_ids = (1,)
    self.bos_id = None

  def encode(self, text: str) -> list[int]:
    ids = []
    for position, char in enumerate(text):
      if char not in self._id_of:
        raise ValueError(
            f"CharTokenizer cannot encode {char!r} at position {position} of {text!r}; "
            f"its alphabet is {_CHARS!r}")
      ids.append(self._id_of[char])
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    """Renders ids as text: pad and eos as nothing, ids outside the vocabulary as U+FFFD.

    A model whose embedding table is larger than `vocab_size` can sample such ids; they
    must not crash scoring, and the replacement character never matches an answer.
    """
    chars = []
    for i in ids:
      i = int(i)
      if i not in (self.pad_id, self.eos_id):
        chars.append(self._char_of.get(i, "\ufffd"))
    return "".join(chars)


def trim_at_eos(ids: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
  """Returns the ids before the first end-of-sequence id (all of them if none)."""
  stop = set(int(i) for i in eos_ids)
  out = []
  for i in ids:
    if int(i) in stop:
      break
    out.append(int(i))
  return out


def load(path: Optional[str]) -> Tokenizer:
  """The tokenizer a run names: a `tokenizer.json` (file or directory), or, for None, the
  character tokenizer of the synthetic task."""
  if path is None:
    return CharTokenizer()
  return hf_tokenizer.load_hf_tokenizer(path)
