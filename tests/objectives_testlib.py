"""Hand-built batches shared by the objectives tests (probabilities chosen to give round
ratios; every expected value in the tests is derived from these numbers by hand)."""
import jax.numpy as jnp
import numpy as np

from minirl_jax import batch as batch_lib

# Two sequences of T = 3; position 0 is the prompt (masked), positions 1-2 are the response.
#                 token:   s0t1  s0t2   s1t1  s1t2
# pi_theta                 0.6   0.7    0.3   0.45
# pi_old                   0.5   0.5    0.5   0.3
# mu_old                   0.4   0.5    0.6   0.05
# r = pi_theta/pi_old      1.2   1.4    0.6   1.5
# pi_theta/mu_old          1.5   1.4    0.5   9.0
# pi_old/mu_old            1.25  1.0    0.833 6.0
# A                        +1    +1    -0.5  -0.5
# With eps_high 0.27, eps_low 0.2: s0t2 (A > 0, r > 1.27) is clipped above, s1t1
# (A < 0, r < 0.8) below; s1t2 has r > 1.27 but A < 0 so MiniRL keeps it, and its weight 9
# is truncated to 5.
PI = [[1.0, 0.6, 0.7], [1.0, 0.3, 0.45]]
OLD = [[1.0, 0.5, 0.5], [1.0, 0.5, 0.3]]
MU = [[1.0, 0.4, 0.5], [1.0, 0.6, 0.05]]
MASK = [[0.0, 1.0, 1.0], [0.0, 1.0, 1.0]]
ADV = [1.0, -0.5]
RTOL = 1e-5  # float32 round trip through log and exp.

# Two prompt groups x two responses of different lengths (T = 4, position 0 the prompt),
# on-policy (pi_theta = pi_old = mu_old, so every ratio and IS weight is 1):
#   row  group  rewards  |y|   log pi of its response tokens
#   0    0      1.0      3     -1, -2, -3
#   1    0      0.0      1     -2
#   2    1      0.5      1     -1
#   3    1      0.0      1     -4
# Group token counts 3 + 1 = 4 and 1 + 1 = 2 (mean lengths 2 and 1); the batch has 6.
# Population-std advantages (the default): each group's two rewards are mean +- d/2 with
# std d/2, so A = +1, -1, +1, -1.
GROUP_SIZE = 2
GROUP_REWARDS = [1.0, 0.0, 0.5, 0.0]
GROUP_MASK = [[0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0],
              [0.0, 0.0, 0.0, 1.0]]
GROUP_LOGP = [[0.0, -1.0, -2.0, -3.0], [0.0, 0.0, 0.0, -2.0], [0.0, 0.0, 0.0, -1.0],
              [0.0, 0.0, 0.0, -4.0]]
GROUP_ADV = [1.0, -1.0, 1.0, -1.0]


def group_means(mask, group_size):
  """[B] mean loss-token count of each row's group (rows [g G, (g + 1) G) are group g)."""
  lengths = np.asarray(mask, np.float32).sum(-1).reshape(-1, group_size)
  return np.repeat(lengths.mean(-1), group_size)


def group_batch(rows=slice(None), num_sequences=None, with_group_lengths=True):
  """The two-group batch (or the mini-batch of `rows`), with the full batch's group means."""
  glm = group_means(GROUP_MASK, GROUP_SIZE) if with_group_lengths else None
  logp = np.asarray(GROUP_LOGP, np.float32)
  mask = np.asarray(GROUP_MASK, np.float32)[rows]
  return batch_from_logp(logp[rows], logp[rows], mask, np.asarray(GROUP_ADV)[rows],
                         num_sequences, group_length_mean=None if glm is None else glm[rows])


def group_logp(rows=slice(None)):
  return jnp.asarray(GROUP_LOGP, jnp.float32)[rows]


def make_batch(old, mu, mask, adv, num_sequences=None, num_tokens=None,
               group_length_mean=None):
  """A TrainBatch from probabilities; counts default to this batch's own."""
  return batch_from_logp(np.log(np.asarray(old, np.float32)),
                         np.log(np.asarray(mu, np.float32)), mask, adv, num_sequences,
                         num_tokens, group_length_mean)


def batch_from_logp(old_logp, mu_logp, mask, adv, num_sequences=None, num_tokens=None,
                    group_length_mean=None):
  """A TrainBatch from log-probs; counts default to this batch's own."""
  mask = np.asarray(mask, np.float32)
  return batch_lib.TrainBatch(
      tokens=jnp.zeros(mask.shape, jnp.int32),
      attn_mask=jnp.ones(mask.shape, bool),
      loss_mask=jnp.asarray(mask),
      advantages=jnp.asarray(adv, jnp.float32),
      old_logp=jnp.asarray(old_logp, jnp.float32),
      mu_logp=jnp.asarray(mu_logp, jnp.float32),
      num_sequences=jnp.float32(mask.shape[0] if num_sequences is None else num_sequences),
      num_tokens=jnp.float32(mask.sum() if num_tokens is None else num_tokens),
      group_length_mean=(None if group_length_mean is None
                         else jnp.asarray(group_length_mean, jnp.float32)))


def hand_batch():
  return make_batch(OLD, MU, MASK, ADV)


def hand_logp():
  return jnp.log(jnp.asarray(PI, jnp.float32))


def response(x_BT):
  """The four response entries s0t1, s0t2, s1t1, s1t2 of a [2, 3] array."""
  return np.asarray(x_BT)[:, 1:].reshape(-1)
