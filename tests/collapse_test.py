"""The collapse criterion: over a run's records, and streamed step by step as the main job
reads it."""
import pytest

from minirl_jax import collapse


def _rl(step, acc=None, entropy=0.3, kl=1e-3, skipped=0.0):
  r = {"step": step, "stage": "rl", "policy/entropy": entropy, "mismatch/kl_k3": kl,
       "optim/skipped": skipped}
  return r | ({"eval/accuracy": acc} if acc is not None else {})


CASES = [
    # accuracy below half its running peak (peak 0.4 >= 0.1) at step 20
    ([{"step": 0, "eval/accuracy": 0.3}, _rl(10, acc=0.4), _rl(20, acc=0.19)], 20),
    # half of step 0's accuracy counts: the peak opens before any update
    ([{"step": 0, "eval/accuracy": 0.3}, _rl(5, acc=0.14)], 5),
    # exactly half the peak is not below it
    ([{"step": 0, "eval/accuracy": 0.25}, _rl(5, acc=0.125)], None),
    # a small peak (< 0.1) never triggers the accuracy rule
    ([{"step": 0, "eval/accuracy": 0.05}, _rl(10, acc=0.08), _rl(20, acc=0.0)], None),
    # entropy under the floor
    ([{"step": 0, "eval/accuracy": 0.3}, _rl(1), _rl(2, entropy=0.01)], 2),
    # a non-finite metric, or a skipped update
    ([{"step": 0, "eval/accuracy": 0.3}, _rl(1, kl=float("nan"))], 1),
    ([{"step": 0, "eval/accuracy": 0.3}, _rl(1), _rl(2, skipped=1.0)], 2),
    ([{"step": 0, "eval/accuracy": 0.3}, _rl(10, acc=0.35), _rl(20, acc=0.3)], None),
    # the first collapse counts, whatever follows
    ([{"step": 0, "eval/accuracy": 0.3}, _rl(1, entropy=0.01), _rl(5, acc=0.5)], 1),
]


@pytest.mark.parametrize("records,want", CASES)
def test_collapse_criterion(records, want):
  assert collapse.collapse_step(records) == want


@pytest.mark.parametrize("records,want", CASES)
def test_watch_streams_the_same_reading(records, want):
  """Step by step (the main job's reading) gives the step the whole record list gives,
  and keeps it once fired."""
  watch = collapse.CollapseWatch()
  seen = [watch.observe(r["step"], r) for r in records]
  assert watch.step == want
  if want is not None:
    first = next(i for i, r in enumerate(records) if r["step"] == want)
    assert seen[:first] == [None] * first and set(seen[first:]) == {want}
