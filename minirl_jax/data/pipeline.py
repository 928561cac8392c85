"""grain input pipelines: RL prompt batches, SFT batches and in-order eval batches, all fixed-shape.

Records are dicts with "prompt", "answer" and (SFT) "solution" strings: see `tasks` and
`sources`. Every batch is a dict of numpy arrays with a fixed shape, so jitted consumers
compile once; string fields ("prompt", "answer") stay on the host.
"""
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import grain
import jax
import numpy as np

from minirl_jax import errors
from minirl_jax.data.tokenizer import Tokenizer

Records = Union[Sequence[dict[str, str]], grain.MapDataset]
FormatPrompt = Callable[[str], str]
# Elements are whole batches and cheap to make: read them on the calling thread, in order.
# A large prefetch buffer would also burn CPU the trainer needs.
DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def rl_prompt_dataset(records: Records, tokenizer: Tokenizer, *, global_batch_size: int,
                      max_prompt_len: int, seed: int, format_prompt: Optional[FormatPrompt] = None,
                      shard_index: Optional[int] = None, shard_count: Optional[int] = None,
                      check_lengths: bool = True,
                      read_options: grain.ReadOptions = DEFAULT_READ_OPTIONS) -> grain.IterDataset:
  """Endless, seeded-shuffled batches of left-padded prompts for RL rollouts.

  Each process reads a disjoint shard of the records; each epoch is reshuffled.

  Args:
    records: prompt records (a sequence or a grain MapDataset).
    tokenizer: a `Tokenizer`.
    global_batch_size: prompts per step over all processes; each process yields
      `global_batch_size // shard_count`.
    max_prompt_len: P, the fixed prompt width. A longer prompt raises (never truncated).
    seed: shuffle seed.
    format_prompt: maps a record's prompt to the model's input text (e.g.
      `hf_tokenizer.math_chat_prompt`); identity if None.
    shard_index: this process's shard; `jax.process_index()` if None.
    shard_count: number of shards; `jax.process_count()` if None.
    check_lengths: check every prompt's length up front (needs a finite, cheap source).
    read_options: grain read options.

  Returns:
    An IterDataset whose iterator (with `get_state`/`set_state`) yields dicts:
      prompt_tokens: int32 [b, P], left-padded with `tokenizer.pad_id`.
      prompt_mask: bool [b, P], False on padding.
      index: int64 [b], the record's position in `records` (before sharding).
      prompt: str [b], the record's prompt (unformatted), for reward functions.
      answer: str [b], the reference answer.
  """
  format_prompt = format_prompt or _identity
  if check_lengths:
    check_prompt_lengths(records, tokenizer, max_prompt_len, format_prompt)
  batch_size, dataset = _endless_shard(records, global_batch_size, shard_index, shard_count)
  encode = lambda r: _encode_prompt(r, tokenizer, max_prompt_len, format_prompt)
  dataset = dataset.shuffle(seed=seed).repeat().map(encode).batch(batch_size, drop_remainder=True)
  return dataset.to_iter_dataset(read_options)


def sft_dataset(records: Records, tokenizer: Tokenizer, *, global_batch_size: int,
                max_prompt_len: int, max_len: int, seed: int,
                format_prompt: Optional[FormatPrompt] = None, shard_index: Optional[int] = None,
                shard_count: Optional[int] = None, check_lengths: bool = True,
                read_options: grain.ReadOptions = DEFAULT_READ_OPTIONS) -> grain.IterDataset:
  """Endless, seeded-shuffled teacher-forcing batches laid out like RL rollouts.

  Row layout (T = `max_len`): the prompt left-padded to P = `max_prompt_len`, then the
  solution and EOS from position P on, then right padding. The prompt sits where it sits
  in a rollout, so SFT and the sampler see the same positions.

  Args:
    records: records with a "solution" field.
    tokenizer: a `Tokenizer`; `tokenizer.eos_id` ends every target.
    global_batch_size: sequences per step over all processes.
    max_prompt_len: P.
    max_len: T > P. A prompt longer than P or a solution + EOS longer than T - P raises.
    seed: shuffle seed.
    format_prompt: as in `rl_prompt_dataset`.
    shard_index: as in `rl_prompt_dataset`.
    shard_count: as in `rl_prompt_dataset`.
    check_lengths: check every record up front.
    read_options: grain read options.

  Returns:
    An IterDataset yielding dicts:
      tokens: int32 [b, T]. attn_mask: bool [b, T], False on padding.
      loss_mask: float32 [b, T], 1 on solution and EOS tokens (the positions whose token
        is predicted, `batch.TrainBatch` convention). index: int64 [b].
  """
  if max_len <= max_prompt_len:
    raise errors.UserError(f"max_len ({max_len}) must exceed max_prompt_len ({max_prompt_len})")
  format_prompt = format_prompt or _identity
  encode = lambda r: _encode_sft(r, tokenizer, max_prompt_len, max_len, format_prompt)
  if check_lengths:
    for i in range(len(records)):
      encode(_with_index(i, records[i]))
  batch_size, dataset = _endless_shard(records, global_batch_size, shard_index, shard_count)
  dataset = dataset.shuffle(seed=seed).repeat().map(encode).batch(batch_size, drop_remainder=True)
  return dataset.to_iter_dataset(read_options)


def eval_prompt_dataset(records: Records, tokenizer: Tokenizer, *, global_batch_size: int,
                        max_prompt_len: int, format_prompt: Optional[FormatPrompt] = None,
                        shard_index: Optional[int] = None,
                        shard_count: Optional[int] = None) -> grain.MapDataset:
  """One in-order pass over `records` (e.g. the held-out split) in fixed-shape batches.

  Nothing is dropped: each shard's last batch is filled with copies of its first record,
  marked `valid == False`. Every shard has the same number of batches.

  Returns:
    A finite MapDataset (iterate it once per evaluation) of `rl_prompt_dataset` batches
    plus valid: bool [b].
  """
  format_prompt = format_prompt or _identity
  batch_size, dataset = _shard(records, global_batch_size, shard_index, shard_count)
  if not len(dataset):
    raise errors.UserError(f"{len(records)} eval records cannot fill every one of the data shards")
  num_shards = global_batch_size // batch_size
  largest_shard = -(-len(records) // num_shards)
  padded_len = -(-largest_shard // batch_size) * batch_size
  rows = []
  for i in range(padded_len):
    record = dataset[i] if i < len(dataset) else dataset[0]
    row = _encode_prompt(record, tokenizer, max_prompt_len, format_prompt)
    rows.append(row | {"valid": i < len(dataset)})
  return grain.MapDataset.source(rows).batch(batch_size, drop_remainder=True)


def check_prompt_lengths(records: Records, tokenizer: Tokenizer, max_prompt_len: int,
                         format_prompt: Optional[FormatPrompt] = None) -> None:
  """Raises a ValueError naming the first record whose prompt exceeds `max_prompt_len` tokens."""
  format_prompt = format_prompt or _identity
  for i in range(len(records)):
    _prompt_ids(_with_index(i, records[i]), tokenizer, max_prompt_len, format_prompt)


def left_pad(ids: Sequence[int], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Right-aligns `ids` in a row of `length`: (int32 tokens, bool mask)."""
  tokens = np.full(length, pad_id, np.int32)
  mask = np.zeros(length, bool)
  if ids:
    tokens[length - len(ids):] = ids
    mask[length - len(ids):] = True
  return tokens, mask


def _identity(text: str) -> str:
  return text


def _where(record: dict[str, Any]) -> str:
  """A record's place: `path: line N` (1-based) for file records, else its 0-based index."""
  return record.get("where") or f"record {record['index']} (0-based)"


def _with_index(index: int, record: dict[str, str]) -> dict[str, Any]:
  return {**record, "index": index}


def _shard(records: Records, global_batch_size: int, shard_index: Optional[int],
           shard_count: Optional[int]) -> tuple[int, grain.MapDataset]:
  """(per-process batch size, this process's indexed records)."""
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  if global_batch_size % shard_count:
    raise errors.UserError(f"global_batch_size {global_batch_size} is not divisible by the "
                           f"{shard_count} data shards (processes)")
  # Not `map_with_index`: past the first epoch it sees indices beyond len(records).
  dataset = grain.MapDataset.range(len(records)).map(lambda i: _with_index(i, records[i]))
  dataset = dataset[shard_index::shard_count]
  return global_batch_size // shard_count, dataset


def _endless_shard(records, global_batch_size, shard_index, shard_count):
  """`_shard` for repeated reading: a shard must not be empty (batches may span epochs)."""
  batch_size, dataset = _shard(records, global_batch_size, shard_index, shard_count)
  if not len(dataset):
    raise errors.UserError(f"{len(records)} records cannot fill every one of the data shards")
  return batch_size, dataset


def _prompt_ids(record: dict[str, Any], tokenizer: Tokenizer, max_prompt_len: int,
                format_prompt: FormatPrompt) -> list[int]:
  try:
    ids = tokenizer.encode(format_prompt(record["prompt"]))
  except ValueError as e:  # a character or token the tokenizer cannot encode
    raise errors.UserError(f"{_where(record)}: {e}") from None
  if len(ids) > max_prompt_len:
    raise errors.UserError(
        f"{_where(record)}: prompt has {len(ids)} tokens > data.max_prompt_len "
        f"{max_prompt_len} (prompts are never truncated): {record['prompt'][:80]!r}")
  return ids


def _encode_prompt(record: dict[str, Any], tokenizer: Tokenizer, max_prompt_len: int,
                   format_prompt: FormatPrompt) -> dict[str, Any]:
  ids = _prompt_ids(record, tokenizer, max_prompt_len, format_prompt)
  tokens, mask = left_pad(ids, max_prompt_len, tokenizer.pad_id)
  return {"prompt_tokens": tokens, "prompt_mask": mask, "index": np.int64(record["index"]),
          "prompt": record["prompt"], "answer": record["answer"]}


def _encode_sft(record: dict[str, Any], tokenizer: Tokenizer, max_prompt_len: int, max_len: int,
                format_prompt: FormatPrompt) -> dict[str, np.ndarray]:
  if "solution" not in record:
    raise errors.UserError(f"{_where(record)}: no 'solution': SFT needs worked solutions")
  prompt_tokens, prompt_mask = left_pad(
      _prompt_ids(record, tokenizer, max_prompt_len, format_prompt), max_prompt_len,
      tokenizer.pad_id)
  target = tokenizer.encode(record["solution"]) + [tokenizer.eos_id]
  room = max_len - max_prompt_len
  if len(target) > room:
    raise errors.UserError(f"{_where(record)}: solution has {len(target)} tokens with EOS > "
                           f"max_len - max_prompt_len = {room} (never truncated)")
  tokens = np.full(max_len, tokenizer.pad_id, np.int32)
  tokens[:max_prompt_len] = prompt_tokens
  tokens[max_prompt_len:max_prompt_len + len(target)] = target
  attn_mask = np.zeros(max_len, bool)
  attn_mask[:max_prompt_len] = prompt_mask
  attn_mask[max_prompt_len:max_prompt_len + len(target)] = True
  loss_mask = np.zeros(max_len, np.float32)
  loss_mask[max_prompt_len:max_prompt_len + len(target)] = 1.0
  return {"tokens": tokens, "attn_mask": attn_mask, "loss_mask": loss_mask,
          "index": np.int64(record["index"])}
