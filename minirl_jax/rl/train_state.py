"""The train state: TrainState, its optimizers, the guarded update that applies a gradient,
and its shardings, abstract shape and random initialisation on a mesh. Reading a state
from files (converted weights, a run's checkpoints) is `rl.checkpointing`'s."""
import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from minirl_jax import sharding
from minirl_jax.models import transformer
from minirl_jax.models import weights
from minirl_jax.metrics import Reduce
from minirl_jax.rl import settings as settings_lib
from minirl_jax.rl.settings import OptimConfig


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # [] int32, optimizer updates so far
  params: Any
  opt_state: Any


def make_optimizer(cfg: OptimConfig, axes) -> optax.GradientTransformation:
  """The optimizer of one stage.

  Args:
    cfg: its settings.
    axes: `transformer.param_axes(model_cfg)`: weight decay reaches exactly the weights
      that are not norm gains (`weights.decay_mask`).
  """
  schedule = optax.schedules.join_schedules(
      [optax.schedules.linear_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1)),
       optax.schedules.constant_schedule(cfg.learning_rate)], [cfg.warmup_steps])
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                  weight_decay=cfg.weight_decay, mask=weights.decay_mask(axes)))


@dataclasses.dataclass(frozen=True)
class Optimizers:
  """A run's two optimizers: the cold start's and RL's (RL's also shapes the state)."""
  sft: optax.GradientTransformation
  rl: optax.GradientTransformation


def optimizers(s: settings_lib.Settings) -> Optimizers:
  """The run's optimizers, from its settings: the one place they are built."""
  axes = transformer.param_axes(s.model)
  return Optimizers(sft=make_optimizer(s.sft_optim(), axes),
                    rl=make_optimizer(s.rl_optim(), axes))


def init_state(params, optimizer) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params))


# What must be finite for an update to be applied, in the order a stop message names them.
GUARDED = ("loss", "gradients", "update", "parameters")


# How `apply_update`'s metrics reduce over a step's updates (`minirl_jax.metrics`).
METRICS = {name: Reduce.UPDATE for name in (
    "optim/grad_norm", "optim/update_norm", "optim/skipped",
    *(f"optim/nonfinite_{quantity}" for quantity in GUARDED))}


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def apply_update(state: TrainState, loss, grads, optimizer) -> tuple[TrainState, dict]:
  """One optimizer update, applied only if the loss, gradients, update and new parameters
  are all finite; otherwise the state (optimizer moments and step included) is left as it
  was, `optim/skipped` is 1 and `optim/nonfinite_<quantity>` says what was not finite."""
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = {name: _all_finite(x) for name, x in zip(GUARDED, (loss, grads, updates, params))}
  ok = jnp.all(jnp.stack(list(finite.values())))
  new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  state = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
  metrics = {"optim/grad_norm": optax.tree.norm(grads),
             "optim/update_norm": optax.tree.norm(updates),
             "optim/skipped": 1.0 - ok.astype(jnp.float32),
             **{f"optim/nonfinite_{name}": 1.0 - f.astype(jnp.float32)
                for name, f in finite.items()}}
  return state, metrics


def state_shardings(model_cfg, mesh, abstract_state):
  """Params by logical axes; optimizer moments like their params; the rest replicated."""
  param_sh = sharding.tree_shardings(abstract_state.params, transformer.param_axes(model_cfg),
                                     mesh)
  opt_sh = sharding.like_params(abstract_state.opt_state, abstract_state.params, param_sh,
                                mesh)
  return TrainState(step=sharding.replicated(mesh), params=param_sh, opt_state=opt_sh)


def abstract_state(s: settings_lib.Settings, mesh):
  """Shapes, dtypes and target shardings of the RL train state; allocates nothing."""
  optimizer = optimizers(s).rl
  shapes = jax.eval_shape(
      lambda key: init_state(transformer.init_params(s.model, key), optimizer),
      jax.random.key(0))
  shardings = state_shardings(s.model, mesh, shapes)
  return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                      shapes, shardings)


def fresh_optimizer(params, optimizer, shardings):
  """A TrainState of `params` with a new optimizer state (step 0), sharded as `shardings`."""
  return jax.jit(lambda p: init_state(p, optimizer), out_shardings=shardings)(params)


def random_init(s: settings_lib.Settings, mesh, key):
  """A TrainState of freshly initialised params (RL's optimizer), created sharded in
  place, and its shardings."""
  optimizer = optimizers(s).rl
  shardings = jax.tree.map(lambda x: x.sharding, abstract_state(s, mesh))
  init = lambda key: init_state(transformer.init_params(s.model, key), optimizer)
  return jax.jit(init, out_shardings=shardings)(key), shardings
