"""Mixture-of-Experts FFN: route -> dispatch -> expert SwiGLU -> combine, with routing replay.

Dispatch is sparse and dropless. RL needs the training and inference engines to compute
the same function whatever the batch composition, and capacity dropping depends on which
tokens share a batch, so no token is ever dropped. Token-expert assignments are sorted by
expert and run as a grouped matmul:
- "blocks" (default): each expert's rows are padded to a multiple of a block size `b`; every
  block belongs to one expert and runs as one batched matmul against that expert's
  gathered weights. Work is ~(N*k + E*b) rows, proportional to top_k, not num_experts.
- "ragged_dot": `jax.lax.ragged_dot`, the grouped-matmul kernel on TPU/GPU. On CPU it lowers
  to a dense masked matmul (E times the ideal FLOPs): select it by measurement
  (scripts/bench_moe.py), never by platform.
- "megablox": the Pallas grouped matmul JAX ships for TPU (`models.megablox`; interpret
  mode on CPU, for tests; `ragged_dot` on GPU), `moe_block_size` rows per tile.
Decode-shaped calls (few assignments per expert, `uses_dense_pass`) can run every token
through every expert instead: each expert's weights are read once, in place, where the
blocks kernel gathers a copy per block. The choice is by shape
(`ModelConfig.moe_dense_max_group`); `scripts/bench_sampler.py` times decode both ways.
Under a mesh with an `expert` axis, each device runs only the experts it holds and token
assignments travel to them by all-to-all (`expert_parallel`). The dense all-experts
reference lives in the tests and the benchmark only.
"""
import functools
import math

import flax
import jax
import jax.numpy as jnp

from minirl_jax.models import expert_parallel
from minirl_jax.models import linear
from minirl_jax.models import megablox


@flax.struct.dataclass
class Routing:
  """Router decisions and statistics of one MoE layer."""
  ids_BTk: jax.Array        # experts that ran, routing dtype
  live_ids_BTk: jax.Array   # the router's own top-k, even under replay; routing dtype
  logits_BTE: jax.Array     # float32 router logits
  probs_BTE: jax.Array      # float32 softmax over all experts
  load_E: jax.Array         # fraction of (valid token, slot) assignments per expert
  load_balance_loss: jax.Array  # []
  router_z_loss: jax.Array      # []


def route(logits_NE, top_k, norm_topk_prob, replay_Nk=None):
  """Top-k routing with optional replay.

  Args:
    logits_NE: float32 router logits.
    top_k: experts per token.
    norm_topk_prob: renormalise the k gate weights to sum to one.
    replay_Nk: experts to run instead of the live top-k; a token whose first entry is -1
      routes live.

  Returns:
    (ids_Nk int32, weights_Nk float32, probs_NE float32). Gate weights always come from the
    live softmax at the chosen ids, so the router receives gradients under replay.
  """
  probs_NE = jax.nn.softmax(logits_NE, axis=-1)
  _, ids_Nk = jax.lax.top_k(probs_NE, top_k)
  if replay_Nk is not None:
    replay_Nk = replay_Nk.astype(jnp.int32)
    ids_Nk = jnp.where(replay_Nk[:, :1] >= 0, replay_Nk, ids_Nk)
  weights_Nk = jnp.take_along_axis(probs_NE, ids_Nk, axis=-1)
  if norm_topk_prob:
    weights_Nk = weights_Nk / jnp.sum(weights_Nk, axis=-1, keepdims=True)
  return ids_Nk, weights_Nk, probs_NE


def block_layout(num_rows, num_experts, max_block) -> tuple[int, int]:
  """(rows per block, blocks) of the "blocks" kernel: a power-of-two block near the mean
  group size (small blocks waste little padding), and enough blocks for every group."""
  mean_group = max(1, math.ceil(num_rows / num_experts))
  b = max(8, min(max_block, 1 << (mean_group - 1).bit_length()))
  return b, -(-(num_rows + min(num_experts, num_rows) * (b - 1)) // b)


def uses_dense_pass(num_assignments, num_experts, max_group) -> bool:
  """Whether `_local_ffn` runs the dense pass: at most `max_group` assignments per expert
  on average (`ModelConfig.moe_dense_max_group`)."""
  return num_assignments <= max_group * num_experts


def _expert_swiglu(x, w_gate, w_up, w_down, eqn_in, eqn_out):
  h = jax.nn.silu(linear.einsum(eqn_in, x, w_gate)) * linear.einsum(eqn_in, x, w_up)
  return linear.einsum(eqn_out, h, w_down)


def _blocks_ffn(x_AD, e_A, group_sizes_E, p, max_block):
  """Block-padded grouped SwiGLU over rows already sorted by expert."""
  num_rows, d = x_AD.shape
  num_experts = group_sizes_E.shape[0]
  b, num_blocks = block_layout(num_rows, num_experts, max_block)
  padded_E = -(-group_sizes_E // b) * b
  padded_end_E = jnp.cumsum(padded_E)
  start_E = jnp.cumsum(group_sizes_E) - group_sizes_E
  dest_A = padded_end_E[e_A] - padded_E[e_A] + jnp.arange(num_rows) - start_E[e_A]
  x_MD = jnp.zeros((num_blocks * b, d), x_AD.dtype).at[dest_A].set(x_AD)
  # Blocks past the last group compute on zero rows whose outputs are never read.
  block_expert = jnp.searchsorted(padded_end_E, jnp.arange(num_blocks) * b, side="right")
  block_expert = jnp.minimum(block_expert, num_experts - 1)
  y_nbD = _gathered_swiglu(x_MD.reshape(num_blocks, b, d), block_expert, p)
  return y_nbD.reshape(num_blocks * b, d)[dest_A]


# The backward keeps the matmuls' outputs and recomputes each block's gathered weights (a
# gather): saved, they were a copy of the expert weights per block and layer held through
# the whole backward (a 1.20x slower update at configs/bench.py, scripts/bench_train.py).
@functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.dots_saveable)
def _gathered_swiglu(x_nbD, block_expert, p):
  return _expert_swiglu(
      x_nbD, linear.take(p["w_gate"], block_expert), linear.take(p["w_up"], block_expert),
      linear.take(p["w_down"], block_expert), "nbd,ndf->nbf", "nbf,nfd->nbd")


def _grouped_ffn(x_AD, group_sizes_E, p, grouped_dot):
  dot = lambda x, w: linear.ragged_dot(x, w, group_sizes_E, grouped_dot)
  h = jax.nn.silu(dot(x_AD, p["w_gate"])) * dot(x_AD, p["w_up"])
  return dot(h, p["w_down"])


def _dense_ffn(x_ND, e_A, p, k, num_experts):
  """Every token through every expert, each expert's weights read once; then the row of
  each assignment. E / k times the FLOPs of the grouped kernels: for decode-shaped calls."""
  # Broadcasting x over the experts makes E a batch axis of both operands: contracting
  # "nd,edf" directly has XLA transpose every expert's weights (a copy of them) per call.
  x_END = jnp.broadcast_to(x_ND, (num_experts, *x_ND.shape))
  y_END = _expert_swiglu(x_END, p["w_gate"], p["w_up"], p["w_down"], "end,edf->enf",
                         "enf,efd->end")
  return y_END[e_A, jnp.arange(e_A.shape[0]) // k]


def _local_ffn(x_ND, e_A, p, *, k=1, impl, max_block, dense_max_group=0):
  """Runs assignment a (token a // k of x_ND) through expert e_A[a] of the experts in `p`
  (w_gate, w_up, w_down [E, ...]); returns [A, D]."""
  num_experts = jax.tree.leaves(p["w_gate"])[0].shape[0]
  if uses_dense_pass(e_A.shape[0], num_experts, dense_max_group):
    return _dense_ffn(x_ND, e_A, p, k, num_experts)
  order_A = jnp.argsort(e_A, stable=True)
  e_sorted_A = e_A[order_A]
  x_sorted_AD = x_ND[order_A // k]
  group_sizes_E = jnp.bincount(e_A, length=num_experts).astype(jnp.int32)
  if impl == "ragged_dot":
    y_sorted_AD = _grouped_ffn(x_sorted_AD, group_sizes_E, p, jax.lax.ragged_dot)
  elif impl == "megablox":
    gmm = functools.partial(megablox.gmm, block_rows=max_block)
    y_sorted_AD = _grouped_ffn(x_sorted_AD, group_sizes_E, p, gmm)
  else:
    y_sorted_AD = _blocks_ffn(x_sorted_AD, e_sorted_A, group_sizes_E, p, max_block)
  return jnp.zeros_like(y_sorted_AD).at[order_A].set(y_sorted_AD)


def experts_ffn(x_ND, ids_Nk, p, *, cfg):
  """Runs each token through its k experts; returns per-assignment outputs [N, k, D].

  Under a mesh whose `expert` axis splits the experts, each device runs only its own
  (`expert_parallel`); otherwise every device runs the whole layer.
  """
  n, k = ids_Nk.shape
  local_ffn = functools.partial(_local_ffn, impl=cfg.moe_impl, max_block=cfg.moe_block_size,
                                dense_max_group=cfg.moe_dense_max_group)
  mesh = expert_parallel.active_mesh(cfg.num_experts)
  if mesh is not None:
    return expert_parallel.experts_ffn(x_ND, ids_Nk, p, mesh, local_ffn=local_ffn,
                                       capacity_factor=cfg.expert_capacity_factor,
                                       padded=cfg.expert_exchange == "padded")
  y_AD = local_ffn(x_ND, ids_Nk.reshape(n * k), p, k=k)
  return y_AD.reshape(n, k, -1)


def _aux_losses(logits_NE, probs_NE, ids_Nk, valid_N):
  """Load-balancing loss (Qwen/Switch form), router z-loss and per-expert load."""
  num_experts = probs_NE.shape[-1]
  valid = valid_N.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(valid), 1.0)
  one_hot_NE = jnp.sum(jax.nn.one_hot(ids_Nk, num_experts), axis=1) * valid[:, None]
  tokens_frac_E = jnp.sum(one_hot_NE, axis=0) / count
  prob_mean_E = jnp.sum(probs_NE * valid[:, None], axis=0) / count
  load_balance = num_experts * jnp.sum(tokens_frac_E * prob_mean_E)
  z = jnp.sum(jnp.square(jax.nn.logsumexp(logits_NE, axis=-1)) * valid) / count
  load_E = tokens_frac_E / ids_Nk.shape[-1]
  return load_E, load_balance, z


def moe_ffn(p, x_BTD, cfg, *, valid_BT, replay_BTk=None):
  """The MoE FFN of one layer.

  Args:
    p: this layer's params: router [D, E], w_gate/w_up [E, D, F], w_down [E, F, D].
    x_BTD: normalised activations.
    cfg: ModelConfig.
    valid_BT: False on padding (excluded from load statistics and aux losses).
    replay_BTk: experts to replay (-1 rows route live), or None.

  Returns:
    (y_BTD, Routing).
  """
  b, t, d = x_BTD.shape
  x_ND = x_BTD.reshape(b * t, d)
  logits_NE = jnp.einsum("nd,de->ne", x_ND.astype(jnp.float32),
                         p["router"].astype(jnp.float32))
  replay_Nk = None if replay_BTk is None else replay_BTk.reshape(b * t, -1)
  ids_Nk, weights_Nk, probs_NE = route(logits_NE, cfg.top_k, cfg.norm_topk_prob, replay_Nk)
  # route's own top_k on the same probs: XLA computes it once.
  live_Nk = ids_Nk if replay_Nk is None else jax.lax.top_k(probs_NE, cfg.top_k)[1]
  y_NkD = experts_ffn(x_ND, ids_Nk, p, cfg=cfg)
  y_ND = jnp.einsum("nkd,nk->nd", y_NkD, weights_Nk.astype(y_NkD.dtype))
  load_E, lb, z = _aux_losses(logits_NE, probs_NE, ids_Nk, valid_BT.reshape(b * t))
  routing = Routing(
      ids_BTk=ids_Nk.reshape(b, t, -1).astype(cfg.routing_dtype),
      live_ids_BTk=live_Nk.reshape(b, t, -1).astype(cfg.routing_dtype),
      logits_BTE=logits_NE.reshape(b, t, -1), probs_BTE=probs_NE.reshape(b, t, -1),
      load_E=load_E, load_balance_loss=lb, router_z_loss=z)
  return y_ND.reshape(b, t, d), routing
