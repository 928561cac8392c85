"""The main job's watchers: what each counts and says, and that a resumed watcher carries on
exactly as an uninterrupted one."""
import os
import signal

import pytest

from minirl_jax import errors
from minirl_jax.rl import watchers


def _record(stage, step, **metrics):
  return {"step": step, "stage": stage, **metrics}


# A run's records as metrics.jsonl holds them: two skipped cold-start updates in a row at the
# end of SFT, RL steps without signal, and a collapse at RL step 4 (accuracy under half its
# running peak of 0.45).
RECORDS = [
    _record("sft", 1, **{"optim/skipped": 0.0}),
    _record("sft", 2, **{"optim/skipped": 1.0, "optim/nonfinite_loss": 1.0}),
    _record("sft", 3, **{"optim/skipped": 1.0, "optim/nonfinite_loss": 1.0}),
    _record("rl", 0, **{"eval/accuracy": 0.4}),
    _record("rl", 1, **{"optim/skipped": 0.0, "reward/zero_adv_frac": 1.0}),
    _record("rl", 2, **{"optim/skipped": 0.0, "reward/zero_adv_frac": 1.0,
                        "eval/accuracy": 0.45}),
    _record("rl", 3, **{"optim/skipped": 0.0, "reward/zero_adv_frac": 0.5}),
    _record("rl", 4, **{"optim/skipped": 0.0, "reward/zero_adv_frac": 1.0,
                        "eval/accuracy": 0.1}),
    _record("rl", 5, **{"optim/skipped": 0.0, "reward/zero_adv_frac": 1.0}),
]

WATCHERS = {
    "skip_guard": lambda: watchers.SkipGuard(limit=10),
    "no_signal": lambda: watchers.NoSignalWatch(warn_after=1),
    "collapse": lambda: watchers.CollapseStop(stop=True),
}


def _observe_all(watcher, records, quiet=False):
  for r in records:
    watcher.observe(r["stage"], r["step"], r, quiet=quiet)


@pytest.mark.parametrize("name", sorted(WATCHERS))
@pytest.mark.parametrize("cut", range(len(RECORDS) + 1))
def test_a_resumed_watcher_has_the_uninterrupted_state(name, cut):
  """Resumed from the records kept up to a checkpoint, a watcher holds the state the
  uninterrupted run had there, and reads the rest alike."""
  live = WATCHERS[name]()
  _observe_all(live, RECORDS[:cut])
  resumed = WATCHERS[name]()
  resumed.resume(RECORDS[:cut])
  assert resumed.state() == live.state()
  _observe_all(live, RECORDS[cut:])
  _observe_all(resumed, RECORDS[cut:])
  assert resumed.state() == live.state()


def test_the_states_at_the_end_of_the_records():
  guard, no_signal, stop = (WATCHERS[name]() for name in ("skip_guard", "no_signal", "collapse"))
  for watcher in (guard, no_signal, stop):
    _observe_all(watcher, RECORDS[:3])
  assert guard.state() == (2,)  # two skipped SFT updates in a row
  for watcher in (guard, no_signal, stop):
    _observe_all(watcher, RECORDS[3:])
  assert guard.state() == (0,)
  assert no_signal.state() == (2, 4)  # steps 4-5 in a row; 1, 2, 4, 5 in all
  assert stop.state() == (0.45, 4) and stop.step == 4 and stop.stopped
  assert not watchers.CollapseStop(stop=False).stopped


def test_replayed_records_are_read_quietly(caplog):
  """Resuming logs nothing and stops nothing: the run did not stop at those steps."""
  guard = watchers.SkipGuard(limit=2)
  with caplog.at_level("WARNING"):
    for watcher in (guard, watchers.NoSignalWatch(warn_after=1),
                    watchers.CollapseStop(stop=True)):
      watcher.resume(RECORDS)
  assert not caplog.records
  assert guard.in_a_row == 0


def test_skip_guard_counts_steps_in_a_row_and_names_the_first_quantity():
  guard = watchers.SkipGuard(limit=3)
  skipped = {"optim/skipped": 1.0, "optim/nonfinite_loss": 0.0,
             "optim/nonfinite_update": 0.5, "optim/nonfinite_parameters": 0.5}
  guard.observe("rl", 1, skipped)
  guard.observe("rl", 2, skipped)
  guard.observe("rl", 3, {"optim/skipped": 0.0})  # a finite step resets the count
  guard.observe("rl", 4, skipped)
  guard.observe("rl", 5, skipped)
  with pytest.raises(errors.RunStopped, match=r"rl step 6: 3 updates in a row were skipped "
                     r"because the update was not finite \(optim.max_skipped_in_a_row=3\)"):
    guard.observe("rl", 6, skipped)


def test_skip_guard_counts_across_stages_but_not_the_rl_evaluation():
  guard = watchers.SkipGuard(limit=3)
  guard.observe("sft", 7, {"optim/skipped": 1.0})
  guard.observe("rl", 0, {"eval/accuracy": 0.5})  # no update at RL step 0
  guard.observe("rl", 1, {"optim/skipped": 1.0})
  assert guard.in_a_row == 2


def test_steps_without_learning_signal_are_named(caplog):
  """After `warn_after` steps in a row with all groups' rewards equal, one warning, and one
  at each doubling of the streak; a step with signal restarts the count; the total counts
  every such step."""
  watch = watchers.NoSignalWatch(warn_after=2)
  fracs = [1.0, 1.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
  with caplog.at_level("WARNING"):
    for step, frac in enumerate(fracs, start=1):
      watch.observe("rl", step, {"reward/zero_adv_frac": frac})
  warnings = [r.getMessage() for r in caplog.records if "no learning signal" in r.getMessage()]
  assert [w.split(" had")[0] for w in warnings] == [
      "RL steps 1-2", "RL steps 4-5", "RL steps 4-7", "RL steps 4-11"]  # not 4-9
  assert watch.total == 10 and watch.in_a_row == 8
  caplog.clear()
  with caplog.at_level("WARNING"):
    watch.summarize(rl_steps=11)  # one step had signal: no summary warning
    assert not caplog.records
    watchers.NoSignalWatch(warn_after=5).summarize(rl_steps=0)
    assert not caplog.records
    all_zero = watchers.NoSignalWatch(warn_after=5)
    for step in (1, 2):
      all_zero.observe("rl", step, {"reward/zero_adv_frac": 1.0})
    all_zero.summarize(rl_steps=2)
  assert "No RL step had a learning signal (2 of 2)" in caplog.records[-1].getMessage()


def test_collapse_is_named_once_at_its_step(caplog):
  stop = watchers.CollapseStop(stop=True)
  with caplog.at_level("WARNING"):
    _observe_all(stop, RECORDS)
  messages = [r.getMessage() for r in caplog.records]
  assert len(messages) == 1 and messages[0].startswith(
      "RL step 4: the run collapsed by the stated criterion")
  assert messages[0].endswith("; it stops here (rl.stop_on_collapse)")


def test_clock_books_each_phase_since_the_previous_lap():
  clock = watchers.Clock()
  assert clock.lap("sample", 3) == 3
  clock.lap("train", None)
  assert sorted(clock.metrics) == ["time/sample_s", "time/train_s"]
  assert all(v >= 0 for v in clock.metrics.values())


def test_stop_signals_are_caught_then_handlers_restored():
  before = signal.getsignal(signal.SIGTERM)
  with watchers.StopSignals() as signals:
    assert not signals.requested()
    os.kill(os.getpid(), signal.SIGTERM)
    assert signals.requested() and signals.received == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) is before


def test_from_process_0_on_one_process_is_the_values():
  assert watchers.from_process_0([3, -1]).tolist() == [3.0, -1.0]
