"""Every program a run compiles, built from shapes alone: nothing is allocated.

`build(settings, mesh)` returns the run's jitted programs with abstract, sharded arguments:
  sft_step   one cold-start update (in `sft` micro-batches), when the run has SFT steps
  rl_step    one policy update on a mini-batch (in `rl` micro-batches), replay routing
             included when `rl.routing_replay` is set
  pi_old     the training engine's forward over the rollout (`step.pi_old`)
  prefill    the sampler's prompt pass
  start      the decode loop's first carry
  decode     the sampler's decode loop (`lax.while_loop`)
`lower(program, mesh, platforms)` lowers one with `jax.export` for a platform this machine
need not have (`scripts/lower.py`, tests/lowering_test.py); tests/plan_child.py compiles
them to check the memory plan. The trainer's programs are jitted as the run jits them
(`wiring.jitted`); rows are sharded over the mesh's batch axes as the run shards them.
"""
import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import export

from minirl_jax import batch as batch_lib
from minirl_jax import sharding
from minirl_jax.models import linear
from minirl_jax.models import transformer
from minirl_jax.rl import settings as settings_lib
from minirl_jax.rl import train_state
from minirl_jax.rl import wiring
from minirl_jax.sampling import quantize as quantize_lib
from minirl_jax.sampling import sampler as sampler_lib

# Custom calls jax.export would refuse for lack of a serialisation guarantee. Lowering is
# what is checked here, not that the serialised module loads in a later jaxlib.
_UNGUARANTEED = ("ragged_all_to_all",)


@dataclasses.dataclass(frozen=True)
class Program:
  """A jitted function, abstract arguments to lower it with, and its static keyword
  arguments (the run's configs)."""
  fn: Callable
  args: tuple
  kwargs: dict = dataclasses.field(default_factory=dict)
  mesh: Any = None  # where it runs when not the run's mesh (the sampler's own devices)

  def __call__(self, *args):
    """Runs the program on concrete arguments shaped like `args`."""
    return self.fn(*args, **self.kwargs)


def _struct(x, sh):
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)


def _rows_sharded(record, mesh):
  """A record's arrays sharded over the batch axes along their declared rows."""
  def one(x, axis):
    sh = (sharding.replicated(mesh) if axis is None
          else sharding.batch_sharding(mesh, len(x.shape), axis))
    return _struct(x, sh)
  return batch_lib.map_rows(one, record)


def _leading_rows_sharded(tree, rows: int, mesh):
  """Each leaf sharded on its first axis of size `rows`, else replicated (records that
  declare no axes: the KV cache and the decode carry)."""
  def one(x):
    axis = next((i for i, n in enumerate(x.shape) if n == rows), None)
    return _struct(x, sharding.replicated(mesh) if axis is None
                   else sharding.batch_sharding(mesh, len(x.shape), axis))
  return jax.tree.map(one, tree)


def sampler_params(abstract_params, s: settings_lib.Settings, mesh):
  """The sampler's weights (`quantize.for_sampler`) as sharded shapes: each field by its
  leaf's logical axes; per-layer records when the sampler does not scan its layers."""
  axes = transformer.param_axes(s.model)
  stacked = dataclasses.replace(s.sampler, scan_layers=True)
  shapes = jax.eval_shape(lambda p: quantize_lib.for_sampler(p, stacked, axes),
                          abstract_params)
  placed = jax.tree.map(
      lambda leaf, names: jax.tree.map(lambda x: _struct(x, jax.sharding.NamedSharding(
          mesh, sharding.logical_spec(x.shape, names, mesh))), leaf),
      shapes, axes, is_leaf=lambda x: isinstance(x, tuple) or linear.is_quantized(x))
  return placed if s.sampler.scan_layers else _per_layer(placed, mesh)


def _per_layer(stacked, mesh):
  """`transformer.unstack_layers` of sharded shapes: each layer's shape and spec without
  the leading layer axis."""
  def drop(x):
    spec = tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(*spec[1:])))
  return {k: tuple(jax.tree.map(drop, v) for _ in range(jax.tree.leaves(v)[0].shape[0]))
          if k in ("attn", "moe", "mlp") else v for k, v in stacked.items()}


def sequence_length(s: settings_lib.Settings) -> int:
  """Tokens per rollout row: the bucketed prompt and the completion."""
  bucket = s.sampler.prompt_bucket
  return -(-s.data.max_prompt_len // bucket) * bucket + s.sampler.max_new_tokens


def _train_batch(s: settings_lib.Settings, rows: int, length: int, mesh):
  cfg = s.model
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  routing = None
  if s.rl.routing_replay is not settings_lib.RoutingReplay.NONE:
    routing = jax.ShapeDtypeStruct((cfg.num_moe_layers, rows, length, cfg.top_k),
                                   cfg.routing_dtype)
  return _rows_sharded(batch_lib.TrainBatch(
      tokens=jax.ShapeDtypeStruct((rows, length), jnp.int32),
      attn_mask=jax.ShapeDtypeStruct((rows, length), bool), loss_mask=f32(rows, length),
      advantages=f32(rows), old_logp=f32(rows, length), mu_logp=f32(rows, length),
      num_sequences=f32(), num_tokens=f32(), routing=routing,
      group_length_mean=f32(rows)), mesh)


def _sft_batch(s: settings_lib.Settings, mesh):
  rows, length = s.sft.batch_size, s.data.max_prompt_len + s.sampler.max_new_tokens
  return _rows_sharded({"tokens": jax.ShapeDtypeStruct((rows, length), jnp.int32),
                        "attn_mask": jax.ShapeDtypeStruct((rows, length), bool),
                        "loss_mask": jax.ShapeDtypeStruct((rows, length), jnp.float32)}, mesh)


def build(s: settings_lib.Settings, mesh, sampler_mesh=None) -> dict[str, Program]:
  """The run's programs (module docstring) on `mesh`, from `s` alone: jitted as the run
  jits them (`wiring.jitted`). With `sampler_mesh` (rl.placement=disaggregated) the
  sampler's programs run there, and pi_old takes the rollout moved to `mesh`."""
  rl = s.rl
  state = train_state.abstract_state(s, mesh)
  jits = wiring.jitted(s, jax.tree.map(lambda x: x.sharding, state))
  programs = {}
  if s.sft.max_steps:
    programs["sft_step"] = Program(jits.sft_step, (state, _sft_batch(s, mesh)))
  programs["rl_step"] = Program(
      jits.rl_step, (state, _train_batch(s, rl.mini_batch_size, sequence_length(s), mesh)))
  sampling = _sampler_programs(s, state.params, mesh if sampler_mesh is None else sampler_mesh)
  if sampler_mesh is not None:
    sampling = {k: dataclasses.replace(p, mesh=sampler_mesh) for k, p in sampling.items()}
  programs.update(sampling)
  rollout = _rows_sharded(programs["start"].args[1], mesh)
  advantages = _struct(jax.ShapeDtypeStruct((rl.global_batch,), jnp.float32),
                       sharding.batch_sharding(mesh, 1))
  programs["pi_old"] = Program(jits.pi_old, (state.params, rollout, advantages))
  return programs


def _sampler_programs(s: settings_lib.Settings, params, mesh) -> dict[str, Program]:
  """prefill, start and decode as `rl.rollout.sample` calls them on this mesh: the
  sampler's own jitted programs with their static configs."""
  rl = s.rl
  shards = sharding.batch_size_multiple(mesh)
  prompts, group_size = rl.prompts_per_step, rl.group_size
  if prompts % shards:  # `rollout.sample`: a prefill per response
    prompts, group_size = prompts * group_size, 1
  kw = dict(model_cfg=s.model, sampler_cfg=s.sampler, group_size=group_size)
  weights = sampler_params(params, s, mesh)
  width = sequence_length(s) - s.sampler.max_new_tokens
  tokens = _leading_rows_sharded(jax.ShapeDtypeStruct((prompts, width), jnp.int32),
                                 prompts, mesh)
  mask = _leading_rows_sharded(jax.ShapeDtypeStruct((prompts, width), bool), prompts, mesh)
  key = _struct(jax.eval_shape(lambda: jax.random.key(0)), sharding.replicated(mesh))
  prefill = Program(sampler_lib.prefill_jit, (weights, tokens, mask, key), kw)
  prefix, rollout = jax.eval_shape(prefill, *prefill.args)
  slots = sampler_lib.num_slots(s.sampler, rl.global_batch, shards)
  start_kw = dict(slots=slots, shards=shards, **kw)
  carry = jax.eval_shape(functools.partial(sampler_lib.start_jit, **start_kw), prefix, rollout)
  prefix = _leading_rows_sharded(prefix, prompts, mesh)
  rollout = _rows_sharded(rollout, mesh)
  carry = carry.replace(
      **{f: _leading_rows_sharded(getattr(carry, f), shards, mesh)
         for f in ("step", "seq", "pos", "queue", "waiting", "num_live")},
      cache=_leading_rows_sharded(carry.cache, slots, mesh), rollout=rollout)
  return {"prefill": prefill,
          "start": Program(sampler_lib.start_jit, (prefix, rollout), start_kw),
          "decode": Program(sampler_lib.decode_jit, (weights, carry, prefix), kw)}


def lower(program: Program, mesh, platforms: tuple[str, ...]) -> export.Exported:
  """`program` lowered for `platforms` (e.g. ("tpu",), ("cuda",)) on `mesh`'s shape."""
  checks = [export.DisabledSafetyCheck.custom_call(name) for name in _UNGUARANTEED]
  with jax.set_mesh(mesh):
    return export.export(program.fn, platforms=platforms, disabled_checks=checks)(
        *program.args, **program.kwargs)


def compiled(program: Program, mesh) -> Any:
  """`program` compiled for this machine's devices (the memory plan's tests)."""
  with jax.set_mesh(mesh):
    return program.fn.lower(*program.args, **program.kwargs).compile()


def lower_all(s: settings_lib.Settings, mesh, platforms: tuple[str, ...]) -> dict:
  """{program: {platform: the lowered module's text, or the error as one line}}."""
  out = {}
  for name, program in build(s, mesh).items():
    out[name] = {}
    for platform in platforms:
      try:
        out[name][platform] = lower(program, mesh, (platform,)).mlir_module()
      except Exception as e:  # reported per program and platform
        out[name][platform] = f"error: {type(e).__name__}: {str(e).splitlines()[0]}"
  return out
