"""The train state of a run, created sharded in place: from a random init, converted weights
(`init_from`) or a training checkpoint's params."""
import os

import jax

from minirl_jax import checkpoint
from minirl_jax import errors
from minirl_jax import sharding
from minirl_jax.models import transformer
from minirl_jax.rl import settings as settings_lib
from minirl_jax.rl import train_step

# The fields that make two ModelConfigs the same network (dtypes, remat etc. may differ).
ARCHITECTURE = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                "head_dim", "num_experts", "top_k", "expert_ffn_dim", "dense_ffn_dim",
                "moe_layers_skip", "norm_topk_prob", "rope_theta", "tie_embeddings")


def state_shardings(model_cfg, mesh, abstract_state):
  """Params by logical axes; optimizer moments like their params; the rest replicated."""
  param_sh = sharding.tree_shardings(abstract_state.params, transformer.param_axes(model_cfg),
                                     mesh)
  opt_sh = sharding.like_params(abstract_state.opt_state, abstract_state.params, param_sh,
                                mesh)
  return train_step.TrainState(step=sharding.replicated(mesh), params=param_sh,
                               opt_state=opt_sh)


def abstract_state(s: settings_lib.Settings, mesh):
  """Shapes, dtypes and target shardings of the RL train state; allocates nothing."""
  optimizer = train_step.make_optimizer(s.rl_optim(), transformer.param_axes(s.model))
  shapes = jax.eval_shape(
      lambda key: train_step.init_state(transformer.init_params(s.model, key), optimizer),
      jax.random.key(0))
  return checkpoint.abstract_like(shapes, state_shardings(s.model, mesh, shapes))


def create(s: settings_lib.Settings, mesh, key):
  """The initial TrainState on the mesh (random, or `s.init_from`'s params) for RL's
  optimizer, and its shardings."""
  optimizer = train_step.make_optimizer(s.rl_optim(), transformer.param_axes(s.model))
  target = abstract_state(s, mesh)
  shardings = jax.tree.map(lambda x: x.sharding, target)
  if not s.init_from:
    init = lambda key: train_step.init_state(transformer.init_params(s.model, key), optimizer)
    return jax.jit(init, out_shardings=shardings)(key), shardings
  check_same_model(checkpoint.read_model_config(s.init_from), s.model, s.init_from)
  params = checkpoint.restore_params(os.path.join(s.init_from, "params"), target.params)
  return fresh_optimizer(params, optimizer, shardings), shardings


def fresh_optimizer(params, optimizer, shardings):
  """A TrainState of `params` with a new optimizer state (step 0), sharded as `shardings`."""
  return jax.jit(lambda p: train_step.init_state(p, optimizer), out_shardings=shardings)(params)


def check_same_model(saved, wanted, where):
  for field in ARCHITECTURE:
    if getattr(saved, field) != getattr(wanted, field):
      raise errors.UserError(f"model.{field} ({getattr(wanted, field)!r}) differs from the "
                       f"checkpoint's ({getattr(saved, field)!r}) in init_from={where}")
