"""Step metrics: how each becomes one number, where they are written, and the plots.

Reduction. An update's metrics come from n micro-batches (inside one jitted update) and a
step's from N mini-batch updates. Each metric's `Reduce` says how both combine; every
producer declares its metrics in a `{name: Reduce}` dict beside the code that computes them
(`objectives.METRICS`, `rl.losses.METRICS`, `rl.train_state.METRICS`), and reducing a
metric that no declaration names raises `UndeclaredMetric`: no metric gets a default rule
by accident.

Writers: JSONL + TensorBoard event files, Weights & Biases when asked for; and the
end-of-run plots.
"""
import enum
import json
import os
import secrets
from typing import Callable, Mapping, Optional, Sequence

from absl import logging
import numpy as np

from minirl_jax import errors

PLOTS = (("reward/mean", "training reward"), ("eval/accuracy", "held-out accuracy"),
         ("policy/entropy", "token entropy"), ("mismatch/kl_mu_pi_old", "train-infer KL"))


class Reduce(enum.Enum):
  """A metric's reduction over micro-batches and over mini-batches (`HOW`)."""
  # A mean over loss tokens divided by the (mini-)batch's GLOBAL token count: the
  # micro-batches' parts add up; mini-batches weigh by their token counts.
  TOKEN_MEAN = "token_mean"
  # Divided by another GLOBAL count of the mini-batch (sequences, or a loss's own
  # normaliser): parts add up; equal-size mini-batches average.
  BATCH_MEAN = "batch_mean"
  MAX = "max"
  # A mean within each forward (router statistics): forwards and updates average.
  FORWARD_MEAN = "forward_mean"
  # Once per optimizer update (norms, skipped updates): updates average.
  UPDATE = "update"
  # Measured once on the whole batch (pi_old's train-infer mismatch); an objective's
  # per-mini-batch copy adds up over micro-batches and is dropped from the step.
  FULL_BATCH = "full_batch"


# (over micro-batches, over mini-batches)
HOW = {Reduce.TOKEN_MEAN: ("sum", "token_weighted"), Reduce.BATCH_MEAN: ("sum", "mean"),
       Reduce.MAX: ("max", "max"), Reduce.FORWARD_MEAN: ("mean", "mean"),
       Reduce.UPDATE: ("mean", "mean"), Reduce.FULL_BATCH: ("sum", "drop")}


class UndeclaredMetric(KeyError):
  """A metric reached a reduction that no producer declared."""


def merge_rules(*declarations: Mapping[str, Reduce]) -> dict[str, Reduce]:
  """One rule table from several producers' declarations (a name declared twice must
  agree)."""
  rules: dict[str, Reduce] = {}
  for declared in declarations:
    for name, rule in declared.items():
      if rules.setdefault(name, rule) is not rule:
        raise ValueError(f"metric {name!r} declared as {rules[name]} and as {rule}")
  return rules


def rule_of(name: str, rules: Mapping[str, Reduce]) -> Reduce:
  try:
    return rules[name]
  except KeyError:
    raise UndeclaredMetric(
        f"metric {name!r} declares no reduction: add it to the METRICS of the module that "
        "produces it (minirl_jax/metrics.py)") from None


def over_micro_batches(stacked: Mapping, rules: Mapping[str, Reduce]) -> dict:
  """One value per metric from n micro-batches' metrics stacked on axis 0 (inside jit)."""
  return {k: getattr(v, HOW[rule_of(k, rules)][0])(axis=0) for k, v in stacked.items()}


def over_mini_batches(per_update: Sequence, rules: Mapping[str, Reduce]) -> dict[str, float]:
  """One step value per metric from `[(metrics, num_tokens)]` of the N updates (host)."""
  weights = np.array([float(n) for _, n in per_update])
  out = {}
  for key in per_update[0][0]:
    how = HOW[rule_of(key, rules)][1]
    if how == "drop":
      continue
    values = np.array([float(m[key]) for m, _ in per_update])
    if how == "max":
      out[key] = float(values.max())
    elif how == "token_weighted":
      out[key] = float(np.sum(values * weights) / np.sum(weights))
    else:
      out[key] = float(values.mean())
  return out


def quiet_library_logs() -> None:
  """absl INFO from orbax and jax (dozens of lines per checkpoint) drowns the progress bar:
  libraries show warnings and errors only, this package its INFO lines too, unless the user
  asked for more with --verbosity."""
  import logging as py_logging
  from absl import flags
  if flags.FLAGS["verbosity"].present:
    return
  own = os.sep + "minirl_jax" + os.sep
  logging.get_absl_handler().addFilter(
      lambda record: record.levelno >= py_logging.WARNING or own in record.pathname)


def to_python(metrics: Mapping) -> dict:
  """Fetches device scalars into plain floats (one transfer per dict)."""
  import jax  # local: keeps this module importable for plotting without a backend
  return {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}


class MetricWriter:
  """Appends `{"step", "stage", **metrics}` lines to DIR/metrics.jsonl and TensorBoard, and
  logs the same scalars to Weights & Biases when `wandb_project` is set.

  Only one process of a multi-host run writes (`enabled`); the others' writes are no-ops.
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool = True,
               wandb_project: Optional[str] = None, config: Optional[dict] = None):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._file = self._tb = self._wandb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._file = open(self.path, "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    if wandb_project:
      self._wandb = WandbRun(wandb_project, workdir, config or {})

  def write(self, step: int, stage: str, metrics: Mapping[str, float]) -> None:
    if self._file is None:
      return
    record = {"step": int(step), "stage": stage, **{k: float(v) for k, v in metrics.items()}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for name, value in metrics.items():
        self._tb.add_scalar(f"{stage}/{name}", float(value), int(step))
    if self._wandb is not None:
      self._wandb.log(int(step), stage, record)

  def plot(self, out_dir: str, stage: str = "rl") -> list[str]:
    """`plot`s this run's metrics into `out_dir` (and to W&B); returns the file names."""
    if self._file is None:
      return []
    written = plot(self.path, out_dir, stage)
    if self._wandb is not None:
      self._wandb.log_images(written)
    return written

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.close()


class WandbRun:
  """One Weights & Biases run per workdir: the run's id is kept in DIR/wandb_run_id, so a
  resumed run continues it (steps redone after the last checkpoint are logged again). Each
  stage's metrics are plotted against its own step (`sft/step`, `rl/step`)."""

  def __init__(self, project: str, workdir: str, config: dict):
    import wandb
    self._wandb = wandb
    id_file = os.path.join(workdir, "wandb_run_id")
    if os.path.exists(id_file):
      with open(id_file, encoding="utf-8") as f:
        run_id = f.read().strip()
    else:
      run_id = secrets.token_hex(6)
      with open(id_file, "w", encoding="utf-8") as f:
        f.write(run_id + "\n")
    # console="off": W&B leaves stdout and stderr (the progress bar) alone.
    self.run = wandb.init(project=project, dir=workdir, id=run_id, resume="allow",
                          name=os.path.basename(os.path.normpath(workdir)), config=config,
                          settings=wandb.Settings(console="off"))
    for stage in ("sft", "rl"):
      self.run.define_metric(f"{stage}/step")
      self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")

  def log(self, step: int, stage: str, record: Mapping) -> None:
    self.run.log({f"{stage}/step": step,
                  **{f"{stage}/{k}": v for k, v in record.items() if k not in ("step", "stage")}})

  def log_images(self, paths: list[str]) -> None:
    self.run.log({f"plots/{os.path.splitext(os.path.basename(p))[0]}": self._wandb.Image(p)
                  for p in paths})

  def close(self) -> None:
    self.run.finish()


def read_jsonl(path: str, drop_cut_last_line: bool = False) -> list[dict]:
  """The records of a JSONL file. A last line cut off mid-write (a killed process) is
  dropped with a warning when `drop_cut_last_line`; any other bad line raises naming it."""
  with open(path, encoding="utf-8", errors="replace") as f:
    lines = [(n, line) for n, line in enumerate(f, start=1) if line.strip()]
  records = []
  for n, line in lines:
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if drop_cut_last_line and n == lines[-1][0] and not line.endswith("\n"):
        logging.warning("%s: line %d was cut off mid-write; dropped it", path, n)
        continue
      raise errors.UserError(f"{path}: line {n}: invalid JSON: {e}") from None
  return records


def keep_only(path: str, keep: Callable[[dict], bool]) -> list[dict]:
  """Rewrites a JSONL file keeping the records `keep` accepts (used on resume); returns
  them ([] when there is no file)."""
  if not os.path.exists(path):
    return []
  records = [r for r in read_jsonl(path, drop_cut_last_line=True) if keep(r)]
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  return records


def plot(path: str, out_dir: str, stage: str = "rl") -> list[str]:
  """Writes one PNG per tracked metric of `stage`; returns the file names."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  records = [r for r in read_jsonl(path) if r["stage"] == stage]
  written = []
  for key, title in PLOTS:
    points = np.array([(r["step"], r[key]) for r in records if key in r])
    if not len(points):
      continue
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(points[:, 0], points[:, 1], marker="." if len(points) < 30 else None)
    ax.set(xlabel=f"{stage} step", ylabel=key, title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    name = os.path.join(out_dir, key.replace("/", "_") + ".png")
    fig.savefig(name, dpi=100)
    plt.close(fig)
    written.append(name)
  return written
