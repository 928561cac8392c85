"""Weights & Biases logging (`log.wandb_project`), offline: the run's files are read back and
hold the same scalars as metrics.jsonl, the run's config and its plots."""
import dataclasses
import glob
import json
import os
import struct

import pytest
from wandb.proto import wandb_internal_pb2  # the [wandb] extra (in [test])

from minirl_jax import errors
from minirl_jax.rl import settings

import rl_loop_test


BLOCK = 32768  # the .wandb file is a LevelDB-style log of protobuf records


def _records(path):
  """The protobuf Records of an offline run's .wandb file."""
  with open(path, "rb") as f:
    data = f.read()
  assert data[:4] == b":W&B"
  pos, pending = 7, b""
  while pos + 7 <= len(data):
    if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
      pos += BLOCK - pos % BLOCK
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    pending += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):  # a whole record, or the last piece of one
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      pending = b""
      yield record


def _read_run(workdir):
  (path,) = glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "run-*.wandb"))
  history, config, files = [], {}, []
  for r in _records(path):
    kind = r.WhichOneof("record_type")
    if kind == "history":
      history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                      for item in r.history.item})
    elif kind == "run":
      config.update({item.key: json.loads(item.value_json) for item in r.run.config.update
                     if item.key != "_wandb"})  # W&B's own bookkeeping
    elif kind == "files":
      files += [f.path for f in r.files.files]
  return path, history, config, files


def test_offline_run_holds_the_jsonl_scalars_config_and_plots(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_MODE", "offline")
  workdir = str(tmp_path / "run")
  overrides = {"rl.steps": 2, "log.wandb_project": "minirl-test", "log.plots": True}
  run = rl_loop_test.smoke_run(workdir, **overrides)
  run.run()
  path, history, config, files = _read_run(workdir)
  with open(os.path.join(workdir, "wandb_run_id"), encoding="utf-8") as f:
    assert os.path.basename(path) == f"run-{f.read().strip()}.wandb"  # resumes reuse it
  logged = [h for h in history if any(k.endswith("/step") for k in h)]
  jsonl = rl_loop_test._records(workdir)
  assert len(logged) == len(jsonl)
  for h, r in zip(logged, jsonl):
    stage = r["stage"]
    assert h[f"{stage}/step"] == r["step"]
    for name, value in r.items():
      if name not in ("step", "stage"):
        assert h[f"{stage}/{name}"] == pytest.approx(value, rel=1e-12, abs=0), name
  # The validated settings the run used, section by section.
  assert config == json.loads(json.dumps(dataclasses.asdict(run.s)))
  assert config["rl"]["steps"] == 2 and config["log"]["wandb_project"] == "minirl-test"
  plotted = {os.path.basename(p).split("_")[0] for p in files if "media/images/plots/" in p}
  assert {"reward", "eval", "policy", "mismatch"} <= plotted


def test_wandb_project_without_wandb_is_one_config_error(monkeypatch):
  monkeypatch.setattr(settings.importlib.util, "find_spec",
                      lambda name: None if name == "wandb" else object())
  with pytest.raises(errors.UserError, match=r"log\.wandb_project.*pip install -e '\.\[wandb\]'"):
    settings.from_config(rl_loop_test.smoke_config(**{"log.wandb_project": "p"}))
