"""Expert parallelism: each device runs only the experts it holds, under `jax.shard_map`.

Under a mesh set around the computation (`jax.set_mesh`, done by every caller through
`sharding.on_mesh`), the MoE layer runs per device: its expert weights are gathered over
`fsdp` at the layer's boundary (FSDP) and its tokens stay where the batch put them, so
what a device holds is predictable (`minirl_jax.plan`). With an `expert` axis of size
ep > 1 (dividing num_experts), every device holds E / ep experts and, since the batch is
split over `expert` too (`sharding.BATCH_AXES`), its own slice of the tokens. Each device:
  1. sorts its token-expert assignments by expert, which groups them by the owning device;
  2. sends each owner its rows with an all-to-all of fixed-size slots;
  3. runs the grouped expert kernel (`moe._local_ffn`) on the rows it received;
  4. returns the outputs with the reverse all-to-all.
Routing ids are data, so replay (R2/R3) needs nothing here.

Dropless with static shapes: a round moves at most `slots` rows per (sender, owner) pair,
slots = ceil(capacity_factor * assignments / ep). If some pair has more, further rounds
run (a `lax.cond` per round inside a `lax.scan` over the worst case), so no assignment is
dropped and the result does not depend on the capacity factor; only the time does. With
a balanced router one round runs, and per-device expert compute is capacity_factor / ep
of the whole batch's. Rounds are recomputed in the backward pass instead of kept, so memory
is one round's buffers, whatever the worst case.

How rows travel depends on the platform the program is lowered for: on TPU and GPU by
`jax.lax.ragged_all_to_all` (only each pair's rows move), on CPU by `jax.lax.all_to_all` of
the padded slots (XLA:CPU does not implement the ragged collective: UNIMPLEMENTED in jax
0.10); `model.expert_exchange="padded"` takes the padded slots everywhere (XLA:TPU does not
support the ragged collective on slices with limited ICI routing, v5e: scripts/compile.py
says so before any hardware is booked). The tests check the padded exchange against the
reference on fake CPU devices, the ragged one against the padded one through an emulation of
the collective's documented semantics (`ragged_collective`; tests/expert_parallel_child.py),
and lower it for `tpu` and `cuda` (tests/lowering_test.py); the real collective has not run
on two accelerators (docs/device.md).
With `tensor` > 1 the layer is left to XLA's partitioner, which splits the experts' hidden
dim over `tensor` (no expert parallelism then).
"""
import functools
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from minirl_jax import sharding

EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")
# The name scope of the scan over exchange rounds, as compiled modules' metadata show it.
ROUNDS_SCOPE = "expert_rounds"


def active_mesh(num_experts: int):
  """The context mesh when the layer runs under shard_map here, else None.

  It does on every mesh of more than one device whose `expert` axis divides E, except
  with `tensor` > 1, where XLA's partitioner splits the experts' hidden dim instead.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or set(sharding.MESH_AXES) - set(mesh.axis_names):
    return None
  if mesh.size == 1 or mesh.shape["tensor"] > 1 or num_experts % mesh.shape["expert"]:
    return None
  return mesh


def experts_ffn(x_ND, ids_Nk, p, mesh, *, local_ffn: Callable, capacity_factor: float,
                padded: bool = False, ragged_collective: Optional[Callable] = None):
  """Per-assignment expert outputs [N, k, D], the experts split over `mesh`'s expert axis.

  Args:
    x_ND: normalised activations.
    ids_Nk: the experts each token runs (global ids).
    p: the layer's params; only the expert weights [E, ...] are used.
    mesh: from `active_mesh`.
    local_ffn: (x_ND, expert_A, expert weights, k=...) -> y_AD on one device's experts,
      assignment a reading row a // k.
    capacity_factor: slot rows per (sender, owner) pair and round, as a multiple of a
      perfectly balanced share.
    padded: the padded exchange on every platform (`model.expert_exchange="padded"`).
    ragged_collective: moves rows with this `jax.lax.ragged_all_to_all` stand-in on every
      platform (the tests' emulation checks the ragged exchange on CPU); None: by platform.
  """
  rows = sharding.logical_spec(x_ND.shape[:1], ("batch",), mesh)[0]
  weights = {name: p[name] for name in EXPERT_WEIGHTS}
  body = functools.partial(_exchange, local_ffn=local_ffn, capacity_factor=capacity_factor,
                           ep=mesh.shape["expert"], axes=tuple(mesh.axis_names),
                           padded=padded, ragged_collective=ragged_collective)
  return jax.shard_map(body, mesh=mesh, in_specs=(P(rows), P(rows), P("expert")),
                       out_specs=P(rows), check_vma=False)(x_ND, ids_Nk, weights)


def rounds_bound(num_tokens: int, top_k: int, local_experts: int, slots: int) -> int:
  """Rounds for the worst case: every token sends min(k, E / ep) assignments to one owner."""
  return math.ceil(num_tokens * min(top_k, local_experts) / slots)


def _exchange(x_nD, ids_nk, weights, *, local_ffn, capacity_factor, ep, axes, padded=False,
              ragged_collective=None):
  """One device's side of the layer (inside shard_map): n local tokens, E / ep experts."""
  n, k = ids_nk.shape
  d = x_nD.shape[-1]
  if ep == 1:  # every expert is here: no exchange
    return local_ffn(x_nD, ids_nk.reshape(n * k).astype(jnp.int32), weights,
                     k=k).reshape(n, k, d)
  num_local = jax.tree.leaves(weights)[0].shape[0]
  a = n * k
  e_A = ids_nk.reshape(a).astype(jnp.int32)
  order_A = jnp.argsort(e_A, stable=True)
  e_sorted_A = e_A[order_A]
  x_sorted_AD = x_nD[order_A // k]
  count_P = jnp.bincount(e_A // num_local, length=ep)  # P: the owning device
  start_P = jnp.cumsum(count_P) - count_P
  slots = max(1, math.ceil(capacity_factor * a / ep))
  # Every device takes the same branch of each round's cond: the collectives inside agree.
  rounds = jax.lax.pmax(-(-jnp.max(count_P) // slots), axes)
  all_to_all = functools.partial(jax.lax.all_to_all, axis_name="expert", split_axis=0,
                                 concat_axis=0)

  def padded_round(y_sorted_AD, r):
    """Fixed-size slots per owner: rows past a pair's count travel as zeros."""
    pos_PS = r * slots + jnp.arange(slots)[None, :]
    sent_PS = pos_PS < count_P[:, None]
    src_PS = jnp.minimum(start_P[:, None] + pos_PS, a - 1)
    # Empty slots carry zero rows for the last local expert: computed, never read back.
    x_PSD = jnp.where(sent_PS[..., None], x_sorted_AD[src_PS], 0)
    e_PS = jnp.where(sent_PS, e_sorted_A[src_PS] % num_local, num_local - 1)
    x_recv, e_recv = all_to_all(x_PSD), all_to_all(e_PS)
    y_RD = local_ffn(x_recv.reshape(ep * slots, d), e_recv.reshape(ep * slots), weights)
    y_PSD = all_to_all(y_RD.reshape(ep, slots, d))
    return y_sorted_AD.at[src_PS].add(jnp.where(sent_PS[..., None], y_PSD, 0))

  def ragged_round(y_sorted_AD, r, collective=jax.lax.ragged_all_to_all):
    """`ragged_all_to_all`: only each pair's rows travel, into the owner's slot range for
    the sender, and the outputs straight back to their sorted positions."""
    ragged = functools.partial(collective, axis_name="expert")
    size_P = jnp.clip(count_P - r * slots, 0, slots).astype(jnp.int32)
    send_at_P = jnp.minimum(start_P + r * slots, a).astype(jnp.int32)
    recv_P = all_to_all(size_P)            # rows each sender sends here
    their_at_P = all_to_all(send_at_P)     # where those rows sit in the sender's order
    here_P = jnp.full((ep,), jax.lax.axis_index("expert") * slots, jnp.int32)
    x_recv = ragged(x_sorted_AD, jnp.zeros((ep * slots, d), x_nD.dtype), send_at_P, size_P,
                    here_P, recv_P)
    e_recv = ragged(e_sorted_A % num_local, jnp.full((ep * slots,), num_local - 1, jnp.int32),
                    send_at_P, size_P, here_P, recv_P)
    y_RD = local_ffn(x_recv, e_recv, weights)
    slot_starts_P = (jnp.arange(ep) * slots).astype(jnp.int32)
    return ragged(y_RD, y_sorted_AD, slot_starts_P, recv_P, their_at_P, size_P)

  def one_round(y_sorted_AD, r):
    if padded:
      return padded_round(y_sorted_AD, r)
    if ragged_collective is not None:
      return ragged_round(y_sorted_AD, r, ragged_collective)
    # XLA:CPU does not implement ragged_all_to_all: the padded exchange runs there.
    return jax.lax.platform_dependent(y_sorted_AD, r, cpu=padded_round, default=ragged_round)

  # Each round is rematerialised in the backward pass: what is kept per possible round is
  # the [A, D] carry, not a round's buffers. A round past `rounds` is a no-op.
  @jax.checkpoint
  def step(y_sorted_AD, r):
    return jax.lax.cond(r < rounds, one_round, lambda y, _: y, y_sorted_AD, r)

  max_rounds = rounds_bound(n, k, num_local, slots)
  with jax.named_scope(ROUNDS_SCOPE):  # cost estimates count this loop as balanced (aot)
    y_sorted_AD, _ = jax.lax.scan(lambda y, r: (step(y, r), None),
                                  jnp.zeros((a, d), x_nD.dtype), jnp.arange(max_rounds))
  y_AD = jnp.zeros_like(y_sorted_AD).at[order_A].set(y_sorted_AD)
  return y_AD.reshape(n, k, d)
