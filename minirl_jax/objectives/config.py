"""The typed, self-validating knobs of every RL objective."""
import dataclasses
import math
import numbers
from typing import Optional

from minirl_jax import errors
from minirl_jax import sections

STD_DDOFS = (0, 1)


class Objective(sections.Choice):
  """`objective.name`: which loss (`objectives.OBJECTIVES`)."""
  MINIRL = "minirl"
  GRPO = "grpo"
  CISPO = "cispo"


class TISTarget(sections.Choice):
  """`objective.tis_target`: what the TIS cap truncates."""
  PI_THETA_MU = "pi_theta_mu"
  PI_OLD_MU = "pi_old_mu"


class TokenNorm(sections.Choice):
  """`objective.token_norm`: the token mean's normaliser."""
  BATCH = "batch"
  GROUP = "group"


class BehaviourLogp(sections.Choice):
  """`objective.behaviour_logp`: the log-prob stored as mu_old."""
  PROCESSED = "processed"
  RAW = "raw"
  PI_OLD = "pi_old"


class ISLevel(sections.Choice):
  """`objective.is_level`: where MiniRL's train-infer correction acts."""
  TOKEN = "token"
  SEQUENCE = "sequence"
  GEOMETRIC = "geometric"


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """Which objective to optimise, and its ablation switches.

  Switches left at `None` take the paper's setting for the chosen objective (read them
  through the `use_*` properties), so `--config.objective.name=grpo` alone gives the
  paper's GRPO:

    field            minirl   grpo     cispo
    train_infer_is   True     False    False
    length_norm      False    True     True  (GRPO: 1/|y_i|; CISPO: 1/sum_i |y_i|)
    normalize_std    False    True     True  (advantages z-scored within the group)

  `tis_target` chooses what the TIS cap truncates. MiniRL's weight is the single token IS
  ratio sg[pi_theta/mu_old] of Eq. 7, and the paper says "the token-level IS weight is
  truncated", so the default "pi_theta_mu" caps that whole weight: min(pi_theta/mu_old, C).
  This bounds every token's gradient by C * |A| whatever the staleness, whereas capping
  only the train-infer factor ("pi_old_mu": min(pi_old/mu_old, C) * pi_theta/pi_old)
  leaves pi_theta/pi_old unbounded on the tokens M_t keeps (A < 0 with r > 1 + eps_high,
  A > 0 with r < 1 - eps_low). On-policy (first mini-batch, pi_theta = pi_old) the two
  coincide. GRPO and CISPO already carry pi_theta/pi_old in their clipped ratio, so their
  optional train-infer factor is always min(pi_old/mu_old, C) and ignores `tis_target`.

  `token_norm` only changes the token-mean reduction (`tokens.TOKEN_MEAN`), i.e. CISPO with
  length_norm: "batch" divides the batch's token sum by sum_i |y_i| over the global batch;
  "group" is the paper's literal CISPO, each prompt group's token sum over that group's own
  token count, averaged over prompts (needs `TrainBatch.group_length_mean`). MiniRL, GRPO,
  CISPO without length_norm and every metric ignore it.

  `behaviour_logp` picks which sampler log-prob the trainer stores as `mu_logp`, the
  behaviour policy mu_old of every IS weight. "processed" is the log-prob under the
  distribution the token was actually drawn from (temperature, top-p and top-k applied), so
  the IS weights correct towards the true behaviour policy; "raw" is the log-prob at
  temperature 1 before any truncation, the paper's mu when the sampler processes nothing.
  With temperature 1 and no top-p/top-k the two are identical. "pi_old" is the zero-gap
  control: mu_old := pi_old, the trainer's own log-probs of the sampled tokens, so the
  train-infer factor pi_old/mu_old is exactly 1 by construction (the tokens still come from
  the sampler, whose float32 engine differs from the trainer by ~1e-7 nats per token).

  `is_level` moves MiniRL's train-infer correction from the token to the sequence
  (`rollout_correction`; w_t = pi_old/mu_old, products in log space):

    is_level     IS weight of every token of y               rejection mask (is_bounds)
    "token"      min(pi_theta/mu_old, C) (Eq. 7, tis_target)  none (is_bounds must be None)
    "sequence"   min(prod_t w_t, C) * pi_theta/pi_old         prod_t w_t outside [lo, hi]
    "geometric"  as "token"                                   exp(mean_t log w_t) outside
                                                              [lo, hi] (is_bounds required)

  A rejected sequence contributes 0 (masked, not truncated); the cap C = `tis_cap` and the
  mask compose, so "sequence" with bounds is seq-TIS + MIS and with `tis_cap=None` pure MIS.
  `train_infer_is=False` drops the weight but keeps the mask (pure rejection, verl's
  "geo_rs"). GRPO and CISPO take only "token".

  Attributes:
    name: "minirl" (Eq. 7), "grpo" or "cispo" (paper appendix).
    eps_low: lower trust-region width: r_t < 1 - eps_low is clipped (A < 0).
    eps_high: upper trust-region width: r_t > 1 + eps_high is clipped (A > 0).
    tis_cap: truncation C of the token IS weight; None disables truncation.
    tis_target: "pi_theta_mu" or "pi_old_mu", see above (MiniRL only).
    train_infer_is: multiply by the train-infer IS weight; None = paper default.
    length_norm: normalise by response length; None = paper default.
    clip: False sets M_t = 1 (MiniRL), drops the PPO min-clip (GRPO) or the weight clip
      (CISPO).
    normalize_std: divide group-centred advantages by the group std; None = paper default.
    grad_cosine_every: the trainer logs `is/grad_cosine_token_seq` every this many steps;
      0 never.
    std_ddof: delta degrees of freedom of the normalize_std group std: 0 population std,
      1 sample std (as many GRPO implementations compute it; needs group_size >= 2).
    token_norm: "batch" or "group", the token-mean normaliser, see above (CISPO only).
    behaviour_logp: "processed" (`Rollout.sample_logp`), "raw" (`Rollout.mu_logp`) or
      "pi_old" (the zero-gap control, see above),
      which sampler log-prob becomes `TrainBatch.mu_logp`, see above.
    is_level: "token", "sequence" or "geometric", see above (MiniRL only).
    is_bounds: (lo, hi) with 0 <= lo <= 1 <= hi (hi may be inf), lo < hi: the accepted
      range of the sequence statistic of `is_level`; None for no rejection.
    is_shuffle: the shuffled-weight control (round 3, part 3): MiniRL's token IS weights
      permuted across the batch's loss tokens, so they keep their spread but lose their
      link to the tokens mu sampled (a permutation seeded by the batch's tokens).
  """
  name: Objective = Objective.MINIRL
  eps_low: float = 0.2
  eps_high: float = 0.27
  tis_cap: Optional[float] = 5.0
  tis_target: TISTarget = TISTarget.PI_THETA_MU
  train_infer_is: Optional[bool] = None
  length_norm: Optional[bool] = None
  clip: bool = True
  normalize_std: Optional[bool] = None
  grad_cosine_every: int = 0
  std_ddof: int = 0
  token_norm: TokenNorm = TokenNorm.BATCH
  behaviour_logp: BehaviourLogp = BehaviourLogp.PROCESSED
  is_level: ISLevel = ISLevel.TOKEN
  is_bounds: Optional[tuple[float, float]] = None
  is_shuffle: bool = False

  def __post_init__(self):
    _choose(self, "name", Objective)
    _check(0.0 <= self.eps_low < 1.0, "eps_low", "must be in [0, 1)", self.eps_low)
    _check(self.eps_high >= 0.0, "eps_high", "must be >= 0", self.eps_high)
    _check(self.tis_cap is None or self.tis_cap > 0.0, "tis_cap", "must be None or > 0",
           self.tis_cap)
    _choose(self, "tis_target", TISTarget)
    for field in ("train_infer_is", "length_norm", "normalize_std"):
      value = getattr(self, field)
      _check(value is None or isinstance(value, bool), field, "must be None or a bool", value)
    _check(isinstance(self.clip, bool), "clip", "must be a bool", self.clip)
    every = self.grad_cosine_every
    _check(isinstance(every, int) and not isinstance(every, bool) and every >= 0,
           "grad_cosine_every", "must be an int >= 0", self.grad_cosine_every)
    ddof = self.std_ddof
    _check(isinstance(ddof, int) and not isinstance(ddof, bool) and ddof in STD_DDOFS,
           "std_ddof", f"must be one of {STD_DDOFS}", ddof)
    _choose(self, "token_norm", TokenNorm)
    _choose(self, "behaviour_logp", BehaviourLogp)
    self._check_rollout_correction()
    _check(isinstance(self.is_shuffle, bool), "is_shuffle", "must be a bool", self.is_shuffle)
    _check(not self.is_shuffle or (self.name == "minirl" and self.is_level == "token"
                                   and self.use_train_infer_is), "is_shuffle",
           "is a control of MiniRL's token IS weights: it needs objective.name='minirl', "
           "is_level='token' and train_infer_is on", self.is_shuffle)

  def _check_rollout_correction(self):
    _choose(self, "is_level", ISLevel)
    level, bounds = self.is_level, self.is_bounds
    _check(level == "token" or self.name == "minirl", "is_level",
           f"must be 'token' for objective.name={self.name!r} (sequence-level corrections "
           "are MiniRL options)", level)
    if bounds is None:
      _check(level != "geometric", "is_bounds",
             "must be set for objective.is_level='geometric': the accepted range of the "
             "per-token geometric mean depends on the train-infer gap (verl uses about "
             "(0.999, 1.001)), so there is no safe default", bounds)
      return
    _check(level != "token", "is_bounds",
           "must be None for objective.is_level='token' (rejection needs 'sequence' or "
           "'geometric')", bounds)
    _check(isinstance(bounds, (tuple, list)) and len(bounds) == 2
           and all(isinstance(b, numbers.Real) and not isinstance(b, bool) for b in bounds),
           "is_bounds", "must be None or a pair of numbers (lo, hi)", bounds)
    lo, hi = (float(b) for b in bounds)
    _check(0.0 <= lo <= 1.0 <= hi and lo < hi,
           "is_bounds", "must satisfy 0 <= lo <= 1 <= hi and lo < hi (hi may be inf), so "
           "a sequence without train-infer gap is always kept", bounds)
    # A list (from a config) would make the frozen config unhashable for jit.
    object.__setattr__(self, "is_bounds", (lo, hi))

  @property
  def log_is_bounds(self) -> tuple[float, float]:
    """(log lo, log hi) of `is_bounds`; (-inf, inf) when None."""
    if self.is_bounds is None:
      return -math.inf, math.inf
    lo, hi = self.is_bounds
    return (-math.inf if lo == 0.0 else math.log(lo)), math.log(hi)

  @property
  def use_train_infer_is(self) -> bool:
    return _or(self.train_infer_is, self.name == "minirl")

  @property
  def use_length_norm(self) -> bool:
    return _or(self.length_norm, self.name != "minirl")

  @property
  def use_normalize_std(self) -> bool:
    return _or(self.normalize_std, self.name != "minirl")


def _or(value: Optional[bool], default: bool) -> bool:
  return default if value is None else value


def _choose(cfg: ObjectiveConfig, field: str, choice: type[sections.Choice]) -> None:
  sections.set_choice(cfg, field, choice, f"objective.{field}")


def _check(ok: bool, field: str, rule: str, value) -> None:
  if not ok:
    raise errors.UserError(f"objective.{field} {rule}, got {value!r}")
