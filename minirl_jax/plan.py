"""Per-device memory of a run, from shapes alone: what `scripts/plan.py` prints.

Parameters, optimizer state, sampler weights and the KV cache are exact: their shapes come
from `jax.eval_shape` of the real initialisers and their per-device shards from the real
sharding rules (`sharding.logical_spec`) on an abstract mesh. Activations are a model of
what XLA keeps alive at the peak of each program, term by term below; tests compare the
totals with XLA's own `memory_analysis()` on 8 fake CPU devices (within 25%).

Three programs run on a device, one at a time, while the train state stays resident:
  train step  (`rl_step`, one mini-batch in micro-batches): + gradients, activations
  pi_old      (`step.pi_old`, the rollout batch in micro-batches): + forward activations
  decode      (the sampler's loop): + sampler weights, KV cache and decode state
"""
import dataclasses
import math
import os
from typing import Mapping

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh

from minirl_jax import errors
from minirl_jax import sharding
from minirl_jax.models import expert_parallel
from minirl_jax.models import flash
from minirl_jax.models import linear
from minirl_jax.models import moe
from minirl_jax.models import transformer
from minirl_jax.models.config import ModelConfig
from minirl_jax.rl import settings as settings_lib
from minirl_jax.rl import train_state
from minirl_jax.sampling import quantize as quantize_lib
from minirl_jax.sampling import sampler as sampler_lib

GIB = 1024 ** 3


def resolve_mesh(mesh: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Mesh axis sizes with -1 filled in for `num_devices` (sharding.make_mesh's rules)."""
  sizes = {a: int(mesh.get(a, 1)) for a in sharding.MESH_AXES}
  fixed = math.prod(v for v in sizes.values() if v != -1)
  return {a: (num_devices // fixed if v == -1 else v) for a, v in sizes.items()}


def _abstract_mesh(sizes):
  return AbstractMesh(tuple(sizes[a] for a in sharding.MESH_AXES), sharding.MESH_AXES)


def _shard_bytes(shape, dtype, names, mesh) -> int:
  spec = sharding.logical_spec(shape, names, mesh)
  parts = math.prod(math.prod(mesh.shape[a] for a in (s if isinstance(s, tuple) else (s,)))
                    for s in spec if s is not None)
  return math.prod(shape) * jnp.dtype(dtype).itemsize // parts


def _tree_bytes(tree, axes, mesh) -> int:
  """Per-device bytes of a params-like tree (quantised records: each field by the leaf's
  logical axes)."""
  total = 0
  for leaf, names in zip(jax.tree.leaves(tree, is_leaf=linear.is_quantized),
                         jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))):
    for part in jax.tree.leaves(leaf):
      total += _shard_bytes(part.shape, part.dtype, names, mesh)
  return total


@dataclasses.dataclass(frozen=True)
class Shapes:
  """The sizes the activation terms need, per device."""
  rows: int          # sequences per micro-batch on one device
  length: int        # tokens per sequence (prompt + completion)
  cfg: ModelConfig
  mesh: dict
  flash: bool = False  # self-attention by the flash kernel (attention_impl="flash" on TPU)
  # XLA:TPU fuses a forward softmax into the matmul that reads it: one float32 buffer per
  # chunk of scores or logits, not two (its buffer assignment, docs/scaling.md).
  fused_softmax: bool = False

  @property
  def tokens(self) -> int:
    return self.rows * self.length


def _moe_rows(n_tok: int, cfg: ModelConfig, mesh) -> tuple[int, int]:
  """(rows the expert kernel runs on one device, experts held there)."""
  ep = mesh["expert"] if cfg.num_experts % mesh["expert"] == 0 else 1
  assignments = n_tok * cfg.top_k
  if ep == 1:
    return assignments, cfg.num_experts
  rows = ep * max(1, math.ceil(cfg.expert_capacity_factor * assignments / ep))
  return rows, cfg.num_experts // ep


def _moe_working_bytes(n_tok: int, cfg: ModelConfig, mesh, backward: bool,
                       stored: bool = False) -> int:
  """One MoE layer's transient buffers: its expert weights gathered over `fsdp`, the
  kernel's rows and, for the "blocks" kernel, the expert weights it gathers per block of
  rows, or the dense pass's hidden rows for every local expert (and the gradients of all
  of these in the backward). `stored`: what the layer keeps for the backward, its rows only;
  the backward gathers the expert weights again (over fsdp, and per block)."""
  c = jnp.dtype(cfg.dtype).itemsize
  d, f = cfg.d_model, cfg.expert_ffn_dim
  rows, local = _moe_rows(n_tok, cfg, mesh)
  if mesh["tensor"] == 1:  # shard_map (expert_parallel): local experts gathered over fsdp
    gathered, split = 3 * local * d * f * c, 1
  else:  # XLA's partitioner keeps the weights' fsdp / tensor shards (an approximation)
    gathered, split = 0, _divides(d, mesh["fsdp"]) * _divides(f, mesh["tensor"])
  assignments = n_tok * cfg.top_k
  kernel = 2 * assignments * d * c  # the tokens' rows by expert, and their outputs
  if local < cfg.num_experts:
    kernel += 2 * rows * d * c  # sent / received rows and outputs of the all-to-all
  if moe.uses_dense_pass(rows, local, cfg.moe_dense_max_group):
    tokens = n_tok if local == cfg.num_experts else rows  # every token, every local expert
    weights, padded = 0, tokens * local * (3 * f + d) * c
  elif cfg.moe_impl == "blocks":
    b, blocks = moe.block_layout(rows, local, cfg.moe_block_size)
    weights = 3 * blocks * d * f * c // split
    padded = blocks * b * (2 * d + 2 * f) * c  # x, gate, up, y per padded row
  else:  # an ideal grouped matmul (TPU/GPU): rows in, hidden, out
    weights, padded = 0, rows * (2 * d + 3 * f) * c
  if stored:
    return kernel + padded
  forward = kernel + weights + padded
  if not backward:
    grouped = not (moe.uses_dense_pass(rows, local, cfg.moe_dense_max_group)
                   or cfg.moe_impl == "blocks")
    if grouped and local == cfg.num_experts:
      # Without an exchange, a grouped matmul's forward holds the rows in and out (`kernel`)
      # and the gate and up projections together, which their product then replaces
      # (XLA:TPU's buffer assignment for moe_1b's pi_old, docs/scaling.md).
      return gathered + kernel + rows * 2 * f * c
    return gathered + forward
  # The backward holds a round's forward buffers, their gradients and recomputed rows;
  # expert parallelism also keeps one [assignments, D] carry per possible round.
  carries = 0
  if local < cfg.num_experts:
    slots = rows // (cfg.num_experts // local)
    carries = expert_parallel.rounds_bound(n_tok, cfg.top_k, local, slots) * (
        assignments * d * c)
  return gathered + 2 * (kernel + weights) + 3 * padded + carries


def _attention_working_bytes(s: Shapes, keys: int, backward: bool) -> int:
  """One attention sublayer's transient buffers: q, k, v, output, and one query chunk's
  float32 scores and probabilities (and their gradients in the backward); with the flash
  kernel (`models.flash`) no scores, but what its wrapper makes: queries, keys and values
  in [B, H, T, K] with the kv heads repeated per query head, the output, and the kernel's
  float32 row maxima and sums (kept 128 lanes wide), and in the backward the gradients
  of the repeated keys and values too."""
  cfg = s.cfg
  c = jnp.dtype(cfg.dtype).itemsize
  heads = cfg.num_heads // _divides(cfg.num_heads, s.mesh["tensor"])
  kv = cfg.num_kv_heads // _divides(cfg.num_kv_heads, s.mesh["tensor"])
  qkv = s.rows * (s.length * 2 * heads + keys * 2 * kv) * cfg.head_dim * c
  if s.flash:
    per_head = s.rows * s.length * heads * cfg.head_dim * c  # one [B, H, T, K] array
    forward = qkv + 4 * per_head + 2 * s.rows * heads * s.length * flash.LANES * 4
    return 2 * forward + 2 * per_head if backward else forward
  chunk = min(cfg.attention_chunk or s.length, s.length)
  scores = s.rows * heads * chunk * keys * 4 * (1 if s.fused_softmax and not backward else 2)
  return (2 if backward else 1) * (qkv + scores)


def _divides(n: int, size: int) -> int:
  return size if size > 1 and n % size == 0 else 1


def _logits_bytes(s: Shapes, backward: bool) -> int:
  """One chunk of float32 logits over the (tensor-split) vocabulary and its softmax, and
  the lm head gathered over `fsdp`."""
  cfg = s.cfg
  vocab = cfg.vocab_size // _divides(cfg.vocab_size, s.mesh["tensor"])
  head = cfg.d_model * vocab * jnp.dtype(cfg.dtype).itemsize
  if cfg.vocab_chunk:
    vocab = min(vocab, cfg.vocab_chunk)
  chunk = min(cfg.logits_chunk or s.length, s.length)
  return head + s.rows * chunk * vocab * 4 * (3 if backward else
                                              1 if s.fused_softmax else 2)


def _layer_carry_bytes(s: Shapes) -> int:
  return s.tokens * s.cfg.d_model * jnp.dtype(s.cfg.dtype).itemsize


def _stored_layer_bytes(s: Shapes) -> int:
  """What one layer keeps for the backward pass without remat: the residual stream,
  normalised inputs, q, k, v, attention output, router logits and probabilities, and the
  MoE kernel's rows."""
  cfg = s.cfg
  c = jnp.dtype(cfg.dtype).itemsize
  attn = s.tokens * c * (3 * cfg.d_model + 2 * cfg.num_heads * cfg.head_dim
                         + 2 * cfg.num_kv_heads * cfg.head_dim)
  router = s.tokens * cfg.num_experts * 4 * 2
  moe = _moe_working_bytes(s.tokens, cfg, s.mesh, backward=False, stored=True)
  return attn + router + moe


def _working_bytes(s: Shapes, keys: int, backward: bool) -> int:
  """The largest of one layer's or the logits' transient buffers, and the residual stream
  in and out."""
  return max(_attention_working_bytes(s, keys, backward),
             _moe_working_bytes(s.tokens, s.cfg, s.mesh, backward),
             _logits_bytes(s, backward)) + 2 * _layer_carry_bytes(s)


def train_activation_bytes(s: Shapes, remat: bool) -> int:
  """Activations of one micro-batch's forward and backward."""
  per_layer = _layer_carry_bytes(s) if remat else _stored_layer_bytes(s)
  return s.cfg.num_layers * per_layer + _working_bytes(s, s.length, backward=True)


def forward_activation_bytes(s: Shapes, keys: int) -> int:
  """A forward pass without gradients: one layer's buffers at a time."""
  return _working_bytes(s, keys, backward=False)


def train_batch_bytes(rows: int, length: int, cfg: ModelConfig, replay: bool) -> int:
  """A TrainBatch's per-device bytes: tokens, masks, log-probs (and routing to replay)."""
  per_token = 4 + 1 + 4 + 4 + 4 + (cfg.num_moe_layers * cfg.top_k if replay else 0)
  return rows * (length * per_token + 8)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Per-device bytes of every part, and the peak of each program with what stays
  resident."""
  mesh: dict
  parts: dict      # name -> bytes
  programs: dict   # name -> bytes (that program's own arguments, outputs and temporaries)
  peaks: dict      # name -> bytes on the device while that program runs

  @property
  def device_bytes(self) -> int:
    return max(self.peaks.values())


def make(s: settings_lib.Settings, num_devices: int, platform: str = "") -> Plan:
  """The plan of a run's settings on `num_devices` devices of `platform` ("tpu" adds what
  XLA:TPU is seen to keep beyond the program's own terms; "" or another: none)."""
  sizes = resolve_mesh(s.mesh, num_devices)
  mesh = _abstract_mesh(sizes)
  cfg = s.model
  axes = transformer.param_axes(cfg)
  optimizer = train_state.optimizers(s).rl
  state = jax.eval_shape(lambda: train_state.init_state(
      transformer.init_params(cfg, jax.random.key(0)), optimizer))
  params = _tree_bytes(state.params, axes, mesh)
  moments = sum(_tree_bytes(optax_moment, axes, mesh)
                for optax_moment in _adam_moments(state.opt_state))
  # Counted in the stacked form, parallel to `axes`: per layer, the bytes are the same.
  stacked = dataclasses.replace(s.sampler, scan_layers=True)
  sampler_params = jax.eval_shape(lambda p: quantize_lib.for_sampler(p, stacked, axes),
                                  state.params)
  sampler_weights = _tree_bytes(sampler_params, axes, mesh)

  shards = math.prod(sizes[a] for a in sharding.BATCH_AXES)
  length = _bucket(s.data.max_prompt_len, s.sampler.prompt_bucket) + s.sampler.max_new_tokens
  rl = s.rl
  on_tpu = platform == "tpu"
  tpu = dict(flash=on_tpu and cfg.attention_impl == "flash", fused_softmax=on_tpu)
  train = Shapes(rows=max(1, rl.mini_batch_size // rl.micro_per_update // shards),
                 length=length, cfg=cfg, mesh=sizes, **tpu)
  old = Shapes(rows=max(1, rl.global_batch // rl.micro_per_global_batch // shards),
               length=length, cfg=cfg, mesh=sizes, **tpu)
  rollout_rows = max(1, rl.global_batch // shards)
  decode_rows = sampler_lib.num_slots(s.sampler, rl.global_batch, shards) // shards
  engine = sampler_lib.engine_config(cfg, s.sampler)
  kv_bytes = lambda rows, slots: sum(
      _shard_bytes(x.shape, x.dtype, _cache_axes(x.ndim), mesh) for x in jax.tree.leaves(
          jax.eval_shape(lambda: transformer.init_kv_cache(engine, rows, slots,
                                                           s.sampler.kv_cache_dtype))))
  prompt = _bucket(s.data.max_prompt_len, s.sampler.prompt_bucket)
  cache_bytes = kv_bytes(decode_rows * shards, length - 1)
  # The loop writes every response of the step (the Rollout) and reads each prompt's
  # cached keys once per slot it starts (prefilled once per prompt).
  decode_state = (rollout_rows * length * (4 * 4 + 1 + cfg.num_moe_layers * cfg.top_k)
                  + kv_bytes(rl.prompts_per_step, prompt))
  decode = Shapes(rows=decode_rows, length=1, cfg=engine, mesh=sizes, **tpu)
  replay = s.rl.routing_replay != "none"
  mini = train_batch_bytes(max(1, s.rl.mini_batch_size // shards), length, cfg, replay)
  # Gradients: the layer scan's backward double-buffers its stacked gradients, micro-batches
  # add an accumulator, and the optimizer's update is one more params-sized temporary.
  grads = params * (3 + (s.rl.micro_per_update > 1))

  parts = {
      "params": params,
      "optimizer_state": moments,
      "gradients": grads,
      "activations_remat": train_activation_bytes(train, remat=True),
      "activations_no_remat": train_activation_bytes(train, remat=False),
      "logits_chunk": _logits_bytes(train, backward=True),
      "train_batch": mini,
      "pi_old_activations": forward_activation_bytes(old, keys=length),
      "sampler_weights": sampler_weights,
      "kv_cache": cache_bytes,
      "decode_state": decode_state,
      "decode_activations": forward_activation_bytes(decode, keys=length),
      # XLA:TPU moves the loop-invariant FSDP all-gather of the sampler's weights out of the
      # decode loop, so the loop holds them gathered over fsdp (its buffer assignment:
      # docs/scaling.md); XLA:CPU does not (tests/plan_test.py).
      "decode_gathered_weights": sampler_weights * (sizes["fsdp"] - 1) if on_tpu else 0,
      # With a head_dim that is not whole 128-lane tiles, XLA:TPU keeps per-layer caches
      # with the sequence minor and gives the decode step a copy with the head minor,
      # padded to whole lanes (moe_1b's buffer assignment: 32 copies of 32 MiB for 16 MiB
      # caches of head_dim 64; docs/scaling.md).
      "decode_cache_relayout": (
          cache_bytes * flash.LANES // cfg.head_dim
          if on_tpu and cfg.head_dim % flash.LANES and not s.sampler.scan_layers
          else 0),
  }
  activations = parts["activations_remat" if cfg.remat else "activations_no_remat"]
  rollout_batch = train_batch_bytes(rollout_rows, length, cfg, replay)
  # A layer scan writes a new stacked cache (two exist during a step); per-layer caches
  # are updated in place.
  caches = 2 if s.sampler.scan_layers else 1
  decode_working = (caches * cache_bytes + decode_state + parts["decode_activations"]
                    + parts["decode_gathered_weights"] + parts["decode_cache_relayout"])
  pi_old_working = parts["pi_old_activations"] + rollout_batch
  programs = {
      "train_step": params + moments + parts["gradients"] + activations + mini,
      "pi_old": params + pi_old_working,
      "decode": sampler_weights + decode_working,
  }
  resident = params + moments + sampler_weights
  peaks = {
      "train_step": resident + parts["gradients"] + activations + rollout_batch,
      "pi_old": resident + pi_old_working,
      "decode": resident + decode_working,
  }
  return Plan(mesh=sizes, parts=parts, programs=programs, peaks=peaks)


def _adam_moments(opt_state):
  """The params-shaped trees inside an optax state (Adam's mu and nu)."""
  found = []
  def visit(node):
    if hasattr(node, "mu") and hasattr(node, "nu"):
      found.extend([node.mu, node.nu])
    elif isinstance(node, (tuple, list)):
      for child in node:
        visit(child)
  visit(opt_state)
  return found


def _cache_axes(ndim: int):
  """Logical axes of the KV cache's leaves ([L, B, S, G, K] values, [L, B, S, G, 1] scales,
  [B, S] validity, [] end)."""
  return {5: ("layers", "batch", None, "kv_heads", None), 2: ("batch", None), 0: ()}[ndim]


def _bucket(length: int, bucket: int) -> int:
  return -(-length // bucket) * bucket


def device_memory_bytes() -> tuple[int, str]:
  """(bytes one local device has, its platform): the runtime's limit on accelerators; on
  CPU the host's physical memory shared by its local devices."""
  device = jax.local_devices()[0]
  stats = device.memory_stats() or {}
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), device.platform
  host = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  return host // jax.local_device_count(), device.platform


def check_fits(s: settings_lib.Settings, num_devices: int, device_bytes: int,
               platform: str) -> None:
  """Refuses, before anything compiles, a run whose largest program the plan puts over a
  device's memory; names it and the largest `sampler.max_new_tokens` that fits, if any.

  The plan models activations within ~25% (tests/plan_test.py), so only a run it puts over
  the whole device is refused: one near the edge is left to the compiler.
  """
  program, peak = max(make(s, num_devices, platform).peaks.items(), key=lambda item: item[1])
  if peak <= device_bytes:
    return
  message = (f"the memory plan (scripts/plan.py) puts the {program} program at "
             f"{peak / GIB:.1f} GiB per device, over the {device_bytes / GIB:.1f} GiB a "
             f"{platform} device has")
  fits = lambda tokens: make(_with_new_tokens(s, tokens), num_devices,
                             platform).device_bytes <= device_bytes
  low, high = 0, s.sampler.max_new_tokens  # fits(low) once low > 0; never fits(high)
  while high - low > 1:
    mid = (low + high) // 2
    low, high = (mid, high) if fits(mid) else (low, mid)
  if low:
    message += f"; the largest sampler.max_new_tokens that fits is {low}"
  raise errors.UserError(message)


def _with_new_tokens(s: settings_lib.Settings, tokens: int) -> settings_lib.Settings:
  return dataclasses.replace(s, sampler=dataclasses.replace(s.sampler, max_new_tokens=tokens))
