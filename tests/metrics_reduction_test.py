"""Metric reduction by construction: every metric an update can report has a rule declared
by its producer, and a metric without one stops the reduction, naming it."""
import jax.numpy as jnp
import pytest

from minirl_jax import objectives
from minirl_jax import metrics
from minirl_jax.objectives import config
from minirl_jax.rl import step
from minirl_jax.rl import train_state
from minirl_jax.metrics import Reduce

import objectives_testlib as lib

VARIANTS = [dict(name="minirl"), dict(name="minirl", is_level="sequence"),
            dict(name="minirl", is_level="geometric", is_bounds=(0.5, 2.0)),
            dict(name="grpo"), dict(name="cispo")]


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: "-".join(map(str, o.values())))
def test_every_objective_metric_has_a_declared_rule(overrides):
  cfg = config.ObjectiveConfig(**overrides)
  _, metrics = objectives.OBJECTIVES[cfg.name](lib.hand_logp(), lib.hand_batch(), cfg)
  assert set(metrics) <= set(step.STEP_METRICS), set(metrics) - set(step.STEP_METRICS)
  _, seq_metrics = objectives.sequence_loss(lib.hand_logp(), lib.hand_batch(), cfg)
  assert set(seq_metrics) <= set(step.STEP_METRICS)


def test_update_and_loss_metrics_are_declared():
  assert {f"optim/nonfinite_{q}" for q in train_state.GUARDED} <= set(train_state.METRICS)
  for name in ("policy/loss", "policy/entropy", "sft/loss", "moe/load_balance_loss",
               "moe/load_max", "optim/grad_norm", "optim/skipped"):
    assert name in step.STEP_METRICS, name


def test_an_undeclared_metric_stops_both_reductions():
  rules = {"policy/clip_frac": Reduce.TOKEN_MEAN}
  with pytest.raises(metrics.UndeclaredMetric, match="'policy/new_thing' declares no"):
    metrics.over_micro_batches({"policy/new_thing": jnp.ones(2)}, rules)
  with pytest.raises(metrics.UndeclaredMetric, match="'policy/new_thing' declares no"):
    metrics.over_mini_batches([({"policy/new_thing": 1.0}, 3.0)], rules)


def test_each_rule_over_micro_and_mini_batches():
  rules = {"t": Reduce.TOKEN_MEAN, "b": Reduce.BATCH_MEAN, "m": Reduce.MAX,
           "f": Reduce.FORWARD_MEAN, "u": Reduce.UPDATE, "x": Reduce.FULL_BATCH}
  stacked = {k: jnp.array([1.0, 3.0]) for k in rules if k != "u"}
  micro = metrics.over_micro_batches(stacked, rules)
  assert {k: float(v) for k, v in micro.items()} == {"t": 4.0, "b": 4.0, "m": 3.0, "f": 2.0,
                                                     "x": 4.0}
  per_update = [({k: 1.0 for k in rules}, 30.0), ({k: 3.0 for k in rules}, 10.0)]
  mini = metrics.over_mini_batches(per_update, rules)
  assert mini == pytest.approx({"t": (30 + 30) / 40, "b": 2.0, "m": 3.0, "f": 2.0, "u": 2.0})


def test_conflicting_declarations_are_refused():
  with pytest.raises(ValueError, match="'a' declared as"):
    metrics.merge_rules({"a": Reduce.MAX}, {"a": Reduce.BATCH_MEAN})
  assert metrics.merge_rules({"a": Reduce.MAX}, {"a": Reduce.MAX}) == {"a": Reduce.MAX}
