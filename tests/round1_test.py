"""Round 1: its grids' arms, and its readers (`rules.ahead` and the findings' rules) on
hand-built arms."""
import pytest

from minirl_jax.experiments import round1
from minirl_jax.experiments import rules


def arm(*finals, collapsed=(), starts=None):
  seeds = range(len(finals))
  return rules.ArmResult(start={s: (starts or finals)[s] for s in seeds},
                         final={s: finals[s] for s in seeds},
                         collapsed={s: s in collapsed for s in seeds})


def test_offpolicy_arms_keep_the_mini_batch_and_grow_n():
  arms = round1.GRIDS["offpolicy"].arms
  assert [a.name for a in arms[:5]] == ["n2/minirl_no_clip", "n2/minirl+r2_no_clip",
                                        "n2/minirl", "n2/minirl+r2", "n2/minirl+r3"]
  assert len(arms) == 15
  for arm_ in arms:
    n, recipe = arm_.name.split("/")
    o = arm_.overrides
    assert o["rl.mini_batch_size"] == 32 and o["rl.prompts_per_step"] * 8 == int(n[1:]) * 32
    assert o["objective.name"] == "minirl"
    assert o.get("objective.clip", True) == ("no_clip" not in recipe)
    replay = "r2" if "+r2" in recipe else "r3" if "+r3" in recipe else None
    assert o.get("rl.routing_replay") == replay


def test_gap_grid_pairs_minirl_and_no_is_at_every_level_from_zero():
  arms = {a.name: a.overrides for a in round1.GRIDS["gap"].arms}
  levels = [name.split("/")[0] for name in arms][:14:2]
  assert levels == ["zero", "float32", "float16", "bfloat16", "int8", "fp8", "int4"]
  # the head-to-head at the widest gap: token-level IS vs sequence-level and geometric
  assert list(arms)[-2:] == ["int4/minirl_seq_tis", "int4/minirl_geo_mis"]
  assert arms["int4/minirl_geo_mis"]["objective.is_level"] == "geometric"
  assert arms["int4/minirl_seq_tis"]["sampler.dtype"] == "int4"
  assert arms["zero/minirl"]["objective.behaviour_logp"] == "pi_old"
  assert arms["int4/minirl_no_is"]["objective.train_infer_is"] is False
  assert arms["int4/minirl_no_is"]["sampler.dtype"] == "int4"


def test_coldstart_arms_branch_from_three_starts():
  arms = round1.GRIDS["coldstart"].arms
  assert [(a.name, dict(a.cold_start)) for a in arms] == [
      ("minirl_from_sft_short", {"sft.target_accuracy": 0.15}),
      ("minirl_from_sft_default", {}),
      ("minirl_from_sft_long", {"sft.target_accuracy": 0.45})]


@pytest.mark.parametrize("a,b,want", [
    (arm(0.40, 0.35, 0.36), arm(0.30, 0.33, 0.31), 1),  # +0.057 mean, every seed +
    (arm(0.30, 0.33, 0.31), arm(0.40, 0.35, 0.36), -1),
    (arm(0.33, 0.37, 0.35), arm(0.30, 0.33, 0.31), 0),  # +0.037 mean: within NOISE
    (arm(0.50, 0.30, 0.40), arm(0.30, 0.31, 0.31), 0),  # +0.093 mean, one seed the other way
    (arm(0.36, 0.35, 0.31), arm(0.30, 0.30, 0.31), 0),  # a tied seed is not "the same way"
    # the collapse clause comes first: 1 of 3 collapsed against 2 of 3 is ahead, whatever
    # the accuracy says
    (arm(0.20, 0.20, 0.20, collapsed=[0]), arm(0.30, 0.30, 0.30, collapsed=[0, 2]), 1),
    (arm(0.3, 0.3, 0.3, collapsed=[0, 1]), arm(0.1, 0.1, 0.1, collapsed=[0, 1, 2]), 1),
])
def test_ahead(a, b, want):
  assert rules.ahead(a, b) == want
  assert rules.ahead(b, a) == -want


def test_gap_reading_per_level_penalty_and_head_to_head():
  arms = {"zero/minirl": arm(0.40, 0.40, 0.40), "zero/minirl_no_is": arm(0.40, 0.40, 0.39),
          "int4/minirl": arm(0.35, 0.36, 0.34),
          "int4/minirl_no_is": arm(0.10, 0.20, 0.30, collapsed=[0, 1]),
          "int4/minirl_seq_tis": arm(0.30, 0.30, 0.30),
          "int4/minirl_geo_mis": arm(0.05, 0.05, 0.05, collapsed=[0, 1, 2])}
  readings = round1.read_gap(arms)
  assert {r.question: r.verdict for r in readings} == {
      "zero: finding 3 (w/o IS collapses)": "not reproduced",
      "zero: MiniRL vs w/o IS": "no difference shown",
      "int4: finding 3 (w/o IS collapses)": "reproduced",
      "int4: MiniRL vs w/o IS": "MiniRL ahead",
      "the w/o-IS penalty grows from zero to int4 by more than 0.04": "yes",
      "int4: token IS vs minirl_seq_tis": "token IS ahead",
      "int4: token IS vs minirl_geo_mis": "token IS ahead"}
  evidence = {r.question: r.evidence for r in readings}
  assert evidence["zero: MiniRL vs w/o IS"] == (
      "0.400 vs 0.397 (per seed +0.000, +0.000, +0.010; collapsed 0/3 vs 0/3)")
  assert evidence["the w/o-IS penalty grows from zero to int4 by more than 0.04"] == (
      "penalty (MiniRL - w/o IS) +0.003 -> +0.150")
  arms["int4/minirl_no_is"] = arm(0.30, 0.30, 0.30, collapsed=[0])  # 1 of 3: undecided
  got = {r.question: r.verdict for r in round1.read_gap(arms)}
  assert got["int4: finding 3 (w/o IS collapses)"] == "inconclusive"


def _offpolicy(collapses, r2_r3):
  """collapses[n] = collapse counts of (no_clip, r2_no_clip, minirl, r3) over 3 seeds;
  r2_r3[n] = (R2 finals, R3 finals)."""
  arms = {}
  for n in (2, 4, 8):
    for name, k in zip(("minirl_no_clip", "minirl+r2_no_clip", "minirl"), collapses[n]):
      arms[f"n{n}/{name}"] = arm(0.3, 0.3, 0.3, collapsed=range(k))
    r2, r3 = r2_r3[n]
    arms[f"n{n}/minirl+r2"] = arm(*r2)
    arms[f"n{n}/minirl+r3"] = arm(*r3, collapsed=range(collapses[n][3]))
  return {r.question: r.verdict for r in round1.read_offpolicy(arms)}


HI, LO, MID = (0.40, 0.40, 0.40), (0.30, 0.30, 0.30), (0.35, 0.35, 0.35)


def test_offpolicy_reading_findings_5_and_6():
  got = _offpolicy({2: (3, 2, 2, 0), 4: (3, 3, 2, 1), 8: (0, 0, 0, 0)},
                   {2: (HI, LO), 4: (LO, HI), 8: (LO, HI)})
  assert [got[f"N = {n}: finding 5 holds"] for n in (2, 4, 8)] == ["yes", "yes", "no"]
  assert got["finding 5 (without clipping or replay, collapse)"] == "reproduced"
  assert got["finding 6 (R2 ahead at N = 2, R3 at N = 4, 8)"] == "reproduced"
  assert got["N = 2: R2 vs R3"] == "R2 ahead" and got["N = 8: R2 vs R3"] == "R3 ahead"
  # nothing collapses, and R3 ahead at N = 2: the opposite of the paper
  got = _offpolicy({n: (0, 0, 0, 0) for n in (2, 4, 8)},
                   {2: (LO, HI), 4: (LO, HI), 8: (LO, HI)})
  assert got["finding 5 (without clipping or replay, collapse)"] == "not reproduced"
  assert got["finding 6 (R2 ahead at N = 2, R3 at N = 4, 8)"] == "not reproduced"
  # no difference anywhere and R2 never collapses: not reproduced; one N right: inconclusive
  got = _offpolicy({n: (1, 0, 0, 0) for n in (2, 4, 8)},
                   {2: (MID, MID), 4: (MID, MID), 8: (MID, MID)})
  assert got["finding 5 (without clipping or replay, collapse)"] == "inconclusive"
  assert got["finding 6 (R2 ahead at N = 2, R3 at N = 4, 8)"] == "not reproduced"
  got = _offpolicy({n: (0, 0, 0, 0) for n in (2, 4, 8)},
                   {2: (HI, LO), 4: (MID, MID), 8: (MID, MID)})
  assert got["finding 6 (R2 ahead at N = 2, R3 at N = 4, 8)"] == "inconclusive"


@pytest.mark.parametrize("starts,finals,collapsed,want", [
    ((0.15, 0.30, 0.45), (0.35, 0.36, 0.38), 0, "reproduced"),   # spread 0.30 -> 0.03
    ((0.15, 0.30, 0.45), (0.20, 0.33, 0.45), 0, "not reproduced"),  # 0.30 -> 0.25
    ((0.15, 0.30, 0.45), (0.25, 0.33, 0.40), 0, "inconclusive"),  # 0.30 -> 0.15: partly
    ((0.30, 0.31, 0.32), (0.30, 0.31, 0.32), 0, "inconclusive"),  # nothing to close
    ((0.15, 0.30, 0.45), (0.05, 0.36, 0.38), 2, "reproduced"),  # the collapsed start is out
])
def test_coldstart_reading(starts, finals, collapsed, want):
  arms = {f"minirl_from_{name}": arm(f, f, f, starts=(s, s, s),
                                     collapsed=range(collapsed) if k == 0 else ())
          for k, (name, s, f) in enumerate(zip(("sft_short", "sft_default", "sft_long"),
                                               starts, finals))}
  (reading,) = round1.read_coldstart(arms)
  assert reading.verdict == want
  assert round1.read_coldstart({}) == []  # a grid cut short has no verdict yet


@pytest.mark.parametrize("name,questions", [
    ("gap", [f"{level}: {q}" for level in ("zero", "float32", "float16", "bfloat16", "int8",
                                           "fp8", "int4")
             for q in ("finding 3 (w/o IS collapses)", "MiniRL vs w/o IS")]
     + ["the w/o-IS penalty grows from zero to int4 by more than 0.04",
        "int4: token IS vs minirl_seq_tis", "int4: token IS vs minirl_geo_mis"]),
    ("offpolicy", [f"N = {n}: finding 5 holds" for n in (2, 4, 8)]
     + ["finding 5 (without clipping or replay, collapse)"]
     + [f"N = {n}: R2 vs R3" for n in (2, 4, 8)]
     + ["finding 6 (R2 ahead at N = 2, R3 at N = 4, 8)"]),
    ("coldstart", ["finding 7 (cold starts converge)"]),
])
def test_every_reading_finds_its_arms_in_the_real_grid(name, questions):
  """A rule reads arms by name: renaming a grid's arm must not silently drop its verdict."""
  grid = round1.GRIDS[name]
  arms = {a.name: arm(0.3, 0.3, 0.3) for a in grid.arms}
  assert [r.question for r in grid.read(arms)] == questions
