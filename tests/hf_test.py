"""Hugging Face import/export: parity with transformers' fixtures, errors, round trips."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from minirl_jax.rl import checkpointing
from minirl_jax import hf_io
from minirl_jax.models import hf_config

import fake_devices

ROOT = pathlib.Path(__file__).parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
TINY, DENSE0 = FIXTURES / "qwen3_moe_tiny", FIXTURES / "qwen3_moe_tiny_dense0"
TOL = 1e-4  # max abs logit difference to transformers in float32


def _tensors(directory):
  """All tensors of a checkpoint directory, by name."""
  out = {}
  for path in sorted(pathlib.Path(directory).glob("*.safetensors")):
    with safe_open(str(path), framework="np") as f:
      out.update({k: f.get_tensor(k) for k in f.keys()})
  return out


def _single_file_copy(src, dst, tensors):
  """A checkpoint directory with src's config.json and `tensors` in one file."""
  os.makedirs(dst)
  shutil.copy(src / "config.json", dst / "config.json")
  save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
  return dst


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module", name="loaded")
def fixture_loaded():
  return {d.name: hf_io.load_hf(str(d)) for d in (TINY, DENSE0)}


def _assert_matches_reference(logits_BTV, routing_LBTk, ref):
  real_BT = ref["attention_mask"].astype(bool)
  assert not real_BT.all()  # the batch has left-padded rows; only real tokens are compared
  assert logits_BTV.dtype == np.float32
  assert np.abs(logits_BTV - ref["logits"])[real_BT].max() < TOL
  np.testing.assert_array_equal(np.sort(routing_LBTk, -1)[:, real_BT],
                                np.sort(ref["routing"], -1)[:, real_BT])


@pytest.mark.parametrize("name", [TINY.name, DENSE0.name])
def test_logits_and_routing_match_transformers(name):
  ref = np.load(FIXTURES / name / "reference.npz")
  logits, routing = hf_io.hf_logits(str(FIXTURES / name), ref["input_ids"], ref["attention_mask"])
  _assert_matches_reference(logits, routing, ref)


def test_fixture_configs_translate(loaded):
  tiny, _ = loaded[TINY.name]
  dense0, params = loaded[DENSE0.name]
  assert (tiny.num_layers, tiny.num_experts, tiny.top_k, tiny.moe_layers_skip) == (3, 8, 2, ())
  assert tiny.norm_topk_prob and not tiny.tie_embeddings and tiny.rope_theta == 10_000.0
  assert dense0.moe_layers_skip == (0,) and dense0.dense_ffn_dim == 48
  assert not dense0.norm_topk_prob and dense0.tie_embeddings and dense0.rope_theta == 1_000.0
  assert params["moe"]["w_gate"].shape == (2, 8, 32, 16) and "lm_head" not in params
  assert params["mlp"]["w_down"].shape == (1, 48, 32)


@pytest.mark.parametrize("name", [TINY.name, DENSE0.name])
def test_layout_fills_every_leaf_once_and_export_inverts_import(name, loaded):
  cfg, _ = loaded[name]
  rng = np.random.default_rng(0)
  for fused in (frozenset(), frozenset(cfg.moe_layer_ids)):
    count = {p: np.zeros(s, np.int32) for p, s in hf_config.leaf_shapes(cfg).items()}
    for piece in hf_config.layout(cfg, fused):
      tensor = rng.standard_normal(piece.hf_shape).astype(np.float32)
      value = piece.to_leaf(tensor)
      assert value.shape == count[piece.leaf][piece.at].shape, piece.name
      count[piece.leaf][piece.at] += 1
      if piece.from_leaf is not None:
        np.testing.assert_array_equal(piece.from_leaf(value), tensor, err_msg=piece.name)
    assert all((c == 1).all() for c in count.values())


def _fused(tensors, cfg):
  """The transformers-5 in-memory layout: experts fused into two tensors per layer."""
  out = dict(tensors)
  for i in cfg.moe_layer_ids:
    pre = f"model.layers.{i}.mlp.experts."
    take = lambda kind: np.stack([out.pop(f"{pre}{e}.{kind}.weight")
                                  for e in range(cfg.num_experts)])
    gate, up, down = take("gate_proj"), take("up_proj"), take("down_proj")
    out[pre + "gate_up_proj"] = np.concatenate([gate, up], axis=1)  # [E, 2F, D]
    out[pre + "down_proj"] = down                                    # [E, D, F]
  return out


def test_fused_expert_layout_loads_identically(loaded, tmp_path):
  cfg, params = loaded[TINY.name]
  src = _single_file_copy(TINY, tmp_path / "fused", _fused(_tensors(TINY), cfg))
  _assert_trees_equal(hf_io.load_hf(str(src))[1], params)


def _hf_config(**changes):
  base = json.loads((TINY / "config.json").read_text())
  return {**base, **changes}


def test_config_4x_and_5x_styles_agree():
  v5 = hf_config.config_from_hf(_hf_config())
  v4 = _hf_config(num_experts=8, rope_theta=10_000.0, rope_scaling=None,
                  torch_dtype="float32")
  for key in ("num_local_experts", "rope_parameters", "dtype"):
    v4.pop(key)
  assert hf_config.config_from_hf(v4) == v5
  assert hf_config.config_from_hf(hf_config.config_to_hf(v5)) == v5


def test_config_decoder_sparse_step_and_overrides():
  cfg = hf_config.config_from_hf(_hf_config(num_hidden_layers=5, decoder_sparse_step=2,
                                            mlp_only_layers=[3]), compute_dtype="bfloat16")
  assert cfg.moe_layer_ids == (1,) and cfg.moe_layers_skip == (0, 2, 3, 4)
  assert cfg.compute_dtype == "bfloat16"


@pytest.mark.parametrize("changes, match", [
    (dict(architectures=["LlamaForCausalLM"], model_type="llama"), "LlamaForCausalLM"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(use_sliding_window=True), "use_sliding_window"),
    (dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0)), "yarn"),
    (dict(rope_scaling=dict(type="linear", factor=2.0)), "linear"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(quantization_config=dict(quant_method="fp8")), "quantization_config"),
    (dict(num_local_experts=0), "num_experts is 0"),
    (dict(num_hidden_layers=None), "num_hidden_layers"),
])
def test_unsupported_configs_name_the_option(changes, match):
  config_json = {k: v for k, v in _hf_config(**changes).items() if v is not None}
  with pytest.raises(ValueError, match=match):
    hf_config.config_from_hf(config_json)


Q0 = "model.layers.0.self_attn.q_proj.weight"


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.pop(Q0), f"missing 1 tensor.*{Q0}"),
    (lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros(2, np.float32)}),
     r"1 unexpected tensor.*model.layers.0.mlp.extra.weight"),
    (lambda t: t.update({Q0: t[Q0][:16]}), rf"{Q0} has shape \[16, 32\].*\[32, 32\]"),
    (lambda t: t.update({"model.layers.1.mlp.experts.gate_up_proj": np.zeros(2, np.float32)}),
     "layer 1 stores experts both fused"),
])
def test_bad_tensors_are_named(edit, match, tmp_path):
  tensors = _tensors(DENSE0)
  edit(tensors)
  src = _single_file_copy(DENSE0, tmp_path / "bad", tensors)
  with pytest.raises(ValueError, match=match):
    hf_io.load_hf(str(src))


@pytest.mark.parametrize("name, max_shard_bytes", [(TINY.name, 50_000), (DENSE0.name, 2**30)])
def test_export_import_round_trip_is_exact(name, max_shard_bytes, loaded, tmp_path):
  cfg, params = loaded[name]
  hf_io.save_hf(str(tmp_path), cfg, params, max_shard_bytes=max_shard_bytes)
  assert (tmp_path / hf_io.INDEX_FILE).exists() == (max_shard_bytes < 2**20)
  cfg2, params2 = hf_io.load_hf(str(tmp_path))
  assert cfg2 == cfg
  _assert_trees_equal(params2, params)
  original, exported = _tensors(FIXTURES / name), _tensors(tmp_path)
  assert original.keys() == exported.keys()
  for k, v in original.items():
    np.testing.assert_array_equal(exported[k], v, err_msg=k)


def test_export_refuses_mismatched_params_and_stale_files(loaded, tmp_path):
  cfg, params = loaded[TINY.name]
  wrong = {**params, "attn": {**params["attn"], "wq": params["attn"]["wq"][:, :16]}}
  with pytest.raises(ValueError, match=r"attn/wq \(config \(3, 32, 4, 8\), params \(3, 16"):
    hf_io.save_hf(str(tmp_path), cfg, wrong)
  hf_io.save_hf(str(tmp_path), cfg, params)
  with pytest.raises(FileExistsError, match="already holds safetensors"):
    hf_io.save_hf(str(tmp_path), cfg, params)


def test_bfloat16_load_and_export(loaded, tmp_path):
  _, params = loaded[DENSE0.name]
  cfg, bf16 = hf_io.load_hf(str(DENSE0), dtype="bfloat16")
  assert cfg.param_dtype == "bfloat16"
  _assert_trees_equal(bf16, jax.tree.map(lambda x: x.astype("bfloat16"), params))
  hf_io.save_hf(str(tmp_path), cfg, bf16)  # BF16 safetensors; config.json says bfloat16
  cfg2, bf16_again = hf_io.load_hf(str(tmp_path))
  assert cfg2 == cfg
  _assert_trees_equal(bf16_again, bf16)


def test_orbax_convert_round_trip(loaded, tmp_path):
  cfg, params = loaded[TINY.name]
  assert hf_io.hf_to_orbax(str(TINY), str(tmp_path / "orbax")) == cfg
  assert checkpointing.read_model_config(str(tmp_path / "orbax")) == cfg
  restored = checkpointing.restore_params(str(tmp_path / "orbax" / checkpointing.PARAMS_DIR))
  _assert_trees_equal(restored, params)
  hf_io.orbax_to_hf(str(tmp_path / "orbax"), str(tmp_path / "hf"))
  exported, original = _tensors(tmp_path / "hf"), _tensors(TINY)
  assert exported.keys() == original.keys()
  assert all(np.array_equal(exported[k], original[k]) for k in original)
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert config["max_position_embeddings"] == 64  # kept from the original config.json


_SHARDED = """
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from minirl_jax import hf_io
from minirl_jax.models import transformer
mesh = jax.make_mesh((2, 2), ("expert", "fsdp"))
def shardings(cfg):
  abstract = jax.eval_shape(lambda: transformer.init_params(cfg, jax.random.key(0)))
  out = jax.tree.map(lambda _: NamedSharding(mesh, P()), abstract)
  for k in ("w_gate", "w_up", "w_down"):
    out["moe"][k] = NamedSharding(mesh, P(None, "expert", "fsdp"))
  out["attn"]["wq"] = NamedSharding(mesh, P(None, "fsdp", "expert"))
  out["embed"] = NamedSharding(mesh, P("fsdp", "expert"))
  return out
_, ref = hf_io.load_hf("{fixture}")
_, got = hf_io.load_hf("{fixture}", shardings=shardings)
assert got["moe"]["w_up"].sharding.spec == P(None, "expert", "fsdp")
assert len(got["moe"]["w_up"].addressable_shards) == 4
for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
print("ok")
"""


def _run(args, **env):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **env}
  result = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_load_onto_a_mesh_reads_shards():
  out = _run(["-c", _SHARDED.format(fixture=TINY)],
             XLA_FLAGS=fake_devices.xla_flags(4))
  assert out.strip().endswith("ok")


def test_hf_logits_script(tmp_path):
  ref = np.load(DENSE0 / "reference.npz")
  np.savez(tmp_path / "in.npz", input_ids=ref["input_ids"], attention_mask=ref["attention_mask"])
  _run(["scripts/hf_logits.py", f"--hf_dir={DENSE0}", f"--input={tmp_path / 'in.npz'}",
        f"--output={tmp_path / 'out.npz'}"])
  out = np.load(tmp_path / "out.npz")
  assert out["routing"].shape == (2, 3, 10, 2)
  _assert_matches_reference(out["logits"], out["routing"], ref)
