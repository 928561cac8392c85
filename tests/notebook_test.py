"""The Colab quickstart runs: every code cell, in order, in one namespace."""
import json
import os
import pathlib

import matplotlib

ROOT = pathlib.Path(__file__).parents[1]


def test_quickstart_notebook_runs(monkeypatch):
  matplotlib.use("Agg")
  monkeypatch.chdir(ROOT)
  notebook = json.loads((ROOT / "notebooks" / "quickstart.ipynb").read_text())
  namespace = {}
  for cell in notebook["cells"]:
    if cell["cell_type"] != "code":
      continue
    source = "".join(line for line in cell["source"] if not line.lstrip().startswith(("%", "!")))
    exec(compile(source, "quickstart.ipynb", "exec"), namespace)
  assert namespace["summary"]["rl_steps"] == 4
  assert "mismatch/kl_mu_pi_old" in namespace["rl"][0]
  assert float(namespace["kl"]) != 0.0  # int8 sampling really differs from the trainer
  assert os.path.exists(os.path.join(namespace["workdir"], "metrics.jsonl"))
  # Section 5: two quick-grid arms branched from one cold start, compared in one figure.
  rows = namespace["rows"]
  assert [r.arm for r in rows] == ["minirl", "minirl_no_is"] and all(r.seeds == 1 for r in rows)
  assert "| minirl_no_is | 1 |" in open(os.path.join(namespace["grid_dir"], "table.md")).read()
  records = [run.records for run in namespace["runs"]]
  assert all([r["step"] for r in rl_records] == [0, 1, 2] for rl_records in records)
  assert records[0][0] == records[1][0]  # same cold start: same accuracy before RL
  assert os.path.getsize(namespace["figure"]) > 10_000
