"""Hugging Face `tokenizer.json` tokenizers (Qwen3) and the Qwen3 chat template for math prompts."""
import os
from collections.abc import Sequence
from typing import Optional

from minirl_jax import errors

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def _import_tokenizers():
  try:
    import tokenizers
  except ImportError as e:
    raise ImportError(
        "Loading a tokenizer.json needs the `tokenizers` package: "
        "pip install 'minirl_jax[hf]' (or pip install tokenizers).") from e
  return tokenizers


class HFTokenizer:
  """A `tokenizers.Tokenizer` with Qwen3's special tokens as pad / EOS.

  EOS ids are `<|im_end|>` (ends an assistant turn, appended to SFT targets) and
  `<|endoftext|>` (ends a document); pad is `<|endoftext|>`. Qwen3 has no BOS.
  """

  def __init__(self, tokenizer, *, eos_tokens=(IM_END, END_OF_TEXT), pad_token=END_OF_TEXT):
    self._tok = tokenizer
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    self.eos_ids = tuple(self._required_id(t) for t in eos_tokens)
    self.eos_id = self.eos_ids[0]
    self.pad_id = self._required_id(pad_token)
    self.bos_id = None

  def _required_id(self, token: str) -> int:
    token_id = self._tok.token_to_id(token)
    if token_id is None:
      raise errors.UserError(f"tokenizer has no token {token!r}; a Qwen3 tokenizer.json has "
                             f"{IM_START!r}, {IM_END!r} and {END_OF_TEXT!r}")
    return token_id

  def encode(self, text: str) -> list[int]:
    """Encodes text; special tokens written in it (e.g. `<|im_start|>`) map to their ids."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    """Decodes ids, dropping special tokens (pad, EOS, chat markers)."""
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_hf_tokenizer(path: str) -> HFTokenizer:
  """Loads `tokenizer.json` from a file path or a checkpoint directory.

  Args:
    path: a `tokenizer.json` file, or a directory that contains one.

  Returns:
    An `HFTokenizer` satisfying the `Tokenizer` protocol.
  """
  tokenizers = _import_tokenizers()
  file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
  if not os.path.isfile(file):
    raise errors.MissingPath(f"no tokenizer.json at {file}")
  return HFTokenizer(tokenizers.Tokenizer.from_file(file))


def math_chat_prompt(problem: str, *, system: Optional[str] = None) -> str:
  """Formats a math problem with the Qwen3 chat template, ending at the assistant header.

  Args:
    problem: the problem statement.
    system: an optional system message.

  Returns:
    `<|im_start|>user\\n{problem}\\n{MATH_INSTRUCTION}<|im_end|>\\n<|im_start|>assistant\\n`,
    preceded by a system turn when `system` is given.
  """
  turns = []
  if system is not None:
    turns.append(f"{IM_START}system\n{system}{IM_END}\n")
  turns.append(f"{IM_START}user\n{problem}\n{MATH_INSTRUCTION}{IM_END}\n")
  turns.append(f"{IM_START}assistant\n")
  return "".join(turns)
