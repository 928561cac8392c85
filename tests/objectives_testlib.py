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


def make_batch(old, mu, mask, adv, num_sequences=None, num_tokens=None):
  """A TrainBatch from probabilities; counts default to this batch's own."""
  return batch_from_logp(np.log(np.asarray(old, np.float32)),
                         np.log(np.asarray(mu, np.float32)), mask, adv, num_sequences,
                         num_tokens)


def batch_from_logp(old_logp, mu_logp, mask, adv, num_sequences=None, num_tokens=None):
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
      num_tokens=jnp.float32(mask.sum() if num_tokens is None else num_tokens))


def hand_batch():
  return make_batch(OLD, MU, MASK, ADV)


def hand_logp():
  return jnp.log(jnp.asarray(PI, jnp.float32))


def response(x_BT):
  """The four response entries s0t1, s0t2, s1t1, s1t2 of a [2, 3] array."""
  return np.asarray(x_BT)[:, 1:].reshape(-1)
