"""Round 3's statistics from Gram matrices, against the same numbers from the vectors."""
import numpy as np
import pytest

from minirl_jax.experiments import round3


def _chunks(rng, signal, noise, chunks):
  return signal[None] + noise * rng.standard_normal((chunks, signal.size))


def _gram(truth, *estimators, names=("e",)):
  """A Gram over the true gradient's chunks and each estimator's, prompt chunk c of
  every set on row c of its block."""
  rows = np.concatenate([truth, *estimators])
  sets = [round3.TRUE] * len(truth) + [n for n, e in zip(names, estimators) for _ in e]
  prompts = np.concatenate([np.arange(len(truth))] + [np.arange(len(e)) for e in estimators])
  return round3.Gram(rows @ rows.T, np.array(sets), prompts)


def test_cosine_and_ceiling_match_the_vectors():
  rng = np.random.default_rng(0)
  g = rng.standard_normal(400)
  h = g + 0.5 * rng.standard_normal(400)  # a biased estimator of g's direction
  truth, est = _chunks(rng, g, 3.0, 32), _chunks(rng, h, 3.0, 32)
  stats = round3.point_stats(_gram(truth, est))["e"]
  m_t, m_e = truth.mean(0), est.mean(0)
  assert stats["cosine"] == pytest.approx(m_t @ m_e / np.linalg.norm(m_t) / np.linalg.norm(m_e))
  # The noise-free cosine the ratio estimates, within sampling error.
  true_cos = g @ h / np.linalg.norm(g) / np.linalg.norm(h)
  assert stats["ratio"] == pytest.approx(true_cos, abs=0.05)
  assert stats["cosine"] < stats["ratio"]  # noise lowers the raw cosine
  # reliability: ||E a||^2 / E||mean a||^2 with noise variance 9 per entry over 32 chunks
  expected = h @ h / (h @ h + 9 * 400 / 32)
  assert stats["reliability"] == pytest.approx(expected, abs=0.06)
  assert stats["rel_error"] == pytest.approx(np.sqrt(1 - stats["cosine"] ** 2))


def test_unbiased_estimator_reads_one_and_split_half_matches_reliability():
  rng = np.random.default_rng(1)
  g = rng.standard_normal(300)
  truth, est = _chunks(rng, g, 2.0, 64), _chunks(rng, g, 2.0, 64)
  g = _gram(truth, est)
  stats = round3.point_stats(g)["e"]
  assert stats["ratio"] == pytest.approx(1.0, abs=0.03)
  half = round3.split_half(g, "e")
  # Spearman-Brown: the reliability of the full mean from the halves' cosine.
  assert 2 * half / (1 + half) == pytest.approx(stats["reliability"], abs=0.03)


def test_variance_is_scale_free_and_matches_the_chunks():
  rng = np.random.default_rng(2)
  g = rng.standard_normal(200)
  truth, est = _chunks(rng, g, 1.0, 40), _chunks(rng, g, 1.0, 40)
  a = round3.point_stats(_gram(truth, est))["e"]
  b = round3.point_stats(_gram(truth, 7.0 * est))["e"]
  assert a["trace_rel"] == pytest.approx(b["trace_rel"])
  assert a["proj_rel"] == pytest.approx(b["proj_rel"])
  m = est.mean(0)
  trace = np.sum(np.var(est, axis=0, ddof=1))
  assert a["trace_rel"] == pytest.approx(trace / (m @ m))
  u = truth.mean(0) / np.linalg.norm(truth.mean(0))
  proj = est @ u
  assert a["proj_rel"] == pytest.approx(np.var(proj, ddof=1) / proj.mean() ** 2)


def test_bootstrap_weights_are_resamples_and_contrasts_pair_them():
  w = round3.bootstrap_weights(10, draws=50)
  assert w.shape == (50, 10) and np.all(w.sum(1) == 10)
  rng = np.random.default_rng(3)
  g = rng.standard_normal(300)
  truth = _chunks(rng, g, 2.0, 32)
  good = _chunks(rng, g, 2.0, 32)
  bad = _chunks(rng, g + 1.5 * rng.standard_normal(300), 2.0, 32)
  names = ("minirl",)
  diff = round3.contrast(_gram(truth, good, names=names), _gram(truth, bad, names=names),
                         "minirl/ratio", draws=200)
  assert diff[1] < diff[0] < diff[2] and diff[1] > 0.02
  assert round3.reading(diff, +1) == "counts"
  assert round3.reading(diff, -1) == "counts against"
  assert round3.reading([0.001, -0.01, 0.012], +1) == "equal"
  assert round3.reading([0.03, -0.01, 0.07], +1) == "inconclusive"


def test_shared_prompts_do_not_count_as_agreement():
  """Truth and estimator on the same prompt chunks share each chunk's own gradient; the
  signal cosine leaves same-prompt pairs out, so an estimator that is pure prompt noise
  (no population signal in common) reads ~0, however much its raw cosine says."""
  rng = np.random.default_rng(4)
  d, chunks = 2000, 16
  g = rng.standard_normal(d)
  prompt_part = 5.0 * rng.standard_normal((chunks, d))  # each chunk's prompts' own gradient
  truth = g + prompt_part + 0.5 * rng.standard_normal((chunks, d))
  unrelated = rng.standard_normal(d)  # shares no population direction with g
  est = unrelated + prompt_part + 0.5 * rng.standard_normal((chunks, d))
  stats = round3.point_stats(_gram(truth, est))["e"]
  assert stats["cosine"] > 0.5  # the shared prompts, read as agreement
  assert abs(stats["ratio"] - g @ unrelated / np.linalg.norm(g) / np.linalg.norm(unrelated)) < 0.15


def test_more_truth_chunks_than_estimator_chunks():
  rng = np.random.default_rng(5)
  g = rng.standard_normal(300)
  truth, est = _chunks(rng, g, 2.0, 128), _chunks(rng, g, 2.0, 32)
  gram = _gram(truth, est)
  assert gram.num_prompts == 128
  stats = round3.point_stats(gram)
  assert stats["e"]["ratio"] == pytest.approx(1.0, abs=0.05)
  assert stats[round3.TRUE]["reliability"] > stats["e"]["reliability"]
  summary = round3.summarise(gram, draws=100)
  low, high = summary["e/ratio"][1:]
  assert low < 1.0 < high + 0.02


def test_grid_varies_one_factor_at_a_time_around_the_base():
  points = round3.grid(("cold",))
  assert points[0] == round3.Point()
  base = round3.Point()
  for p in points:
    differs = [f for f in ("staleness", "length", "gap", "replay")
               if getattr(p, f) != getattr(base, f)]
    # replay is measured at the base gap and at int4: two factors at most, then
    assert len(differs) <= 1 or (set(differs) == {"gap", "replay"} and p.gap == "int4")
  assert {p.gap for p in points} == set(round3.GAPS)
  assert {p.staleness for p in points} == set(round3.STALENESS)
  assert {p.replay for p in points} == set(round3.REPLAYS)
  assert len({p.name for p in points}) == len(points)
  # points sharing a true gradient share checkpoint, staleness and length
  assert round3.Point(gap="int4").truth_key == base.truth_key != round3.Point(
      staleness=1).truth_key


def _measured(point, bias, rng, kl):
  """A point whose MiniRL has signal cosine ~cos(bias) against the truth; w/o IS worse."""
  from minirl_jax.experiments import round3_report
  d, chunks = 300, 24
  g = rng.standard_normal(d)
  off = rng.standard_normal(d)
  truth = _chunks(rng, g, 1.0, chunks)
  ests = [_chunks(rng, g + b * off, 1.0, chunks)
          for b in (bias, bias * 2, 0.0, bias, bias, bias)]
  gram = _gram(truth, *ests, names=round3.ESTIMATOR_NAMES)
  stats = [{"mismatch/kl_k3": kl, "moe/routing_disagreement": 0.1,
            "rollout/length_mean": 100.0, "reward/mean": 0.1}]
  summary = {"stats": round3.summarise(gram, draws=50), "chunk_stats": stats}
  return round3_report.Measured(point, summary, gram)


def test_report_reads_the_predictions_from_the_points(tmp_path):
  from minirl_jax.experiments import round3_report
  rng = np.random.default_rng(6)
  points = {p: _measured(p, bias, rng, kl) for p, bias, kl in (
      (round3.Point(gap="zero"), 0.0, 0.0), (round3.Point(), 0.5, 1e-3),
      (round3.Point(gap="int4"), 1.0, 1e-2))}
  rows = round3_report.readings(points, draws=50)
  by = {(r[0], r[1]): r for r in rows}
  assert by[("P1 (extreme)", "minirl: zero - int4")][3] == "counts"
  assert ("P1", "minirl: zero - fp8") in by and ("P1", "minirl: fp8 - int4") in by
  assert by[("P3", "int4: minirl - minirl_no_is")][3] == "counts"
  assert by[("P3", "zero: minirl - minirl_no_is")][3] == "equal"
  assert by[("P6", "int4: seq_is signal cosine")][3].startswith("unbiased")
  lines = round3_report.markdown(points, draws=50)
  assert sum(line.startswith("| cold/k0/medium/") for line in lines) == 3 + 3 * 6
  assert round3_report.plot_gap(points, str(tmp_path / "gap.png")) is not None
  assert (tmp_path / "gap.png").stat().st_size > 1000


def test_part3_arms_are_valid_configs_scored_under_the_trainers_policy():
  import pathlib
  from minirl_jax import config_base
  from minirl_jax.experiments import grids
  from minirl_jax.experiments import report
  from minirl_jax.rl import settings
  grid = grids.get("round3")
  assert [a.name for a in grid.arms] == ["minirl", "minirl_no_is", "minirl_shuffled",
                                         "zero_gap"]
  root = pathlib.Path(__file__).parents[1]
  for arm in grid.arms:
    config = config_base.sibling(str(root / grid.base_config), "paper_moe")
    grids.apply(config, arm.overrides)
    s = settings.from_config(config)
    assert s.rl.eval_trainer and arm.seeds == 10
    assert s.objective.is_shuffle == (arm.name == "minirl_shuffled")
    assert (s.objective.behaviour_logp == "pi_old") == (arm.name == "zero_gap")
    assert s.objective.use_train_infer_is == (arm.name != "minirl_no_is")
  run = report.Run(arm="minirl", seed=0, wall_s=1.0, records=[
      {"step": 190, "eval/accuracy_full": 0.1, "eval/accuracy_full_trainer": 0.3},
      {"step": 200, "eval/accuracy_full": 0.2, "eval/accuracy_full_trainer": 0.4}],
      collapse_step=None)
  assert grid.scored(run) == [(190, 0.3), (200, 0.4)]
  assert "eval/accuracy_full_trainer" in grid.series
