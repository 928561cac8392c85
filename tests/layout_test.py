"""Run and arm names: one format, one parse, and where a run says it has finished."""
import pytest

from minirl_jax import errors
from minirl_jax.experiments import layout


@pytest.mark.parametrize("arm,seed", [("minirl", 0), ("n8/minirl+r3", 12),
                                      ("gap/int4/minirl_seq_tis", 2)])
def test_run_names_round_trip(arm, seed):
  name = layout.run_name(arm, seed)
  assert layout.parse_run_name(name) == (arm, seed)
  assert layout.run_dir("/w", arm, seed) == f"/w/{name}"
  assert layout.parse_run_name(layout.run_dir("/w", arm, seed))[1] == seed


def test_run_names_are_arm_slash_seed():
  assert layout.run_name("n8/minirl", 3) == "n8/minirl/seed_3"
  for bad in ("minirl", "minirl/seed_x", "seed_0", "minirl/seed_", "minirl/3"):
    with pytest.raises(errors.UserError, match=f"run '{bad}' is not named ARM/seed_K"):
      layout.parse_run_name(bad)


def test_arm_levels():
  assert layout.arm_name("n8", "minirl+r3") == "n8/minirl+r3"
  assert layout.split_arm("n8/minirl+r3") == ("n8", "minirl+r3")
  assert layout.split_arm("int4/minirl_geo_mis") == ("int4", "minirl_geo_mis")
  assert layout.split_arm("minirl") == ("", "minirl")


def test_a_run_is_done_once_its_summary_is_written(tmp_path):
  assert not layout.done(str(tmp_path)) and layout.summary(str(tmp_path)) == {}
  layout.write_summary(str(tmp_path), {"wall_s": 12.5})
  assert layout.done(str(tmp_path)) and layout.summary(str(tmp_path)) == {"wall_s": 12.5}
