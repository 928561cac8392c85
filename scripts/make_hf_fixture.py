"""Dev tool: tiny random Qwen3-MoE checkpoints plus transformers' reference outputs.

Needs the dev tools in docs/hf.md (torch, transformers). Rewrites tests/fixtures/qwen3_moe_tiny*:
  python scripts/make_hf_fixture.py
"""
import os
import tempfile

from absl import app
from absl import flags
import jax
import numpy as np
import torch
import transformers

from minirl_jax import hf_io
from minirl_jax.models import transformer

_OUT = flags.DEFINE_string("out", "tests/fixtures", "Directory that gets one folder per fixture.")
_SEED = flags.DEFINE_integer("seed", 0, "torch seed for weights and tokens.")

_BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             num_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-6,
             max_position_embeddings=64)
# Name -> (config overrides, max shard size): the first is sharded with an index file; the
# second has a dense first layer, unnormalised top-k weights and tied embeddings.
FIXTURES = {
    "qwen3_moe_tiny": (dict(norm_topk_prob=True, rope_parameters=dict(
        rope_type="default", rope_theta=10_000.0)), "100KB"),
    "qwen3_moe_tiny_dense0": (dict(mlp_only_layers=[0], norm_topk_prob=False,
                                   tie_word_embeddings=True, rope_parameters=dict(
                                       rope_type="default", rope_theta=1_000.0)), None),
}
PAD_LEFT = (0, 4, 1)  # left padding of each batch row
SEQ_LEN = 10
MIN_MARGIN = 1e-3  # smallest allowed gap between the k-th and (k+1)-th router prob


def _randomize(model):
  """Weights O(1/sqrt(fan_in)) and norms near (not at) one, so every tensor matters."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)


def _batch(vocab):
  mask = np.stack([np.arange(SEQ_LEN) >= pad for pad in PAD_LEFT]).astype(np.int32)
  ids = torch.randint(1, vocab, (len(PAD_LEFT), SEQ_LEN)).numpy().astype(np.int32)
  return np.where(mask, ids, 0).astype(np.int32), mask


def _reference(model, ids, mask, top_k):
  """Logits and top-k experts with positions counted over real tokens, as `generate` does."""
  position_ids = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                position_ids=torch.tensor(position_ids, dtype=torch.long),
                output_router_logits=True)
  b, t = ids.shape
  router_logits = torch.stack(out.router_logits).float()  # [L, B*T, E]
  probs = torch.softmax(router_logits, -1).reshape(-1, b, t, router_logits.shape[-1])
  top = torch.topk(probs, top_k + 1, dim=-1).values
  margin = (top[..., top_k - 1] - top[..., top_k]).numpy()[:, mask.astype(bool)].min()
  routing = torch.topk(probs, top_k, dim=-1).indices.numpy().astype(np.int32)
  logits = out.logits.float().numpy() * mask[..., None]  # pad positions carry no reference
  return logits.astype(np.float32), routing * mask[..., None], margin


def _jax_parity(directory, ids, mask, ref):
  cfg, params = hf_io.load_hf(directory)
  logits, aux = transformer.forward(params, ids, cfg=cfg, attn_mask_BT=mask.astype(bool))
  real = mask.astype(bool)
  diff = np.abs(np.asarray(logits) - ref["logits"])[real].max()
  same = (np.sort(np.asarray(aux.routing), -1) == np.sort(ref["routing"], -1)).all(-1)
  return cfg, params, diff, same[:, real].mean()


def _check_export(cfg, params, model, ids, mask, ref_logits):
  """save_hf output loads in transformers with identical weights and logits."""
  with tempfile.TemporaryDirectory() as tmp:
    hf_io.save_hf(tmp, cfg, params)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="eager")
  want, got = model.state_dict(), again.state_dict()
  assert want.keys() == got.keys(), set(want) ^ set(got)
  assert all(torch.equal(want[k], got[k]) for k in want)
  logits, _, _ = _reference(again, ids, mask, cfg.top_k)
  assert np.array_equal(logits, ref_logits)


def make(name, out_root, seed):
  overrides, shard = FIXTURES[name]
  torch.manual_seed(seed)
  config = transformers.Qwen3MoeConfig(**_BASE, **overrides, attn_implementation="eager")
  model = transformers.Qwen3MoeForCausalLM(config).eval()
  _randomize(model)
  ids, mask = _batch(config.vocab_size)
  logits, routing, margin = _reference(model, ids, mask, config.num_experts_per_tok)
  assert margin > MIN_MARGIN, f"{name}: router near-tie ({margin:.2e}); try another --seed"
  directory = os.path.join(out_root, name)
  model.save_pretrained(directory, max_shard_size=shard or "5GB")
  ref = dict(input_ids=ids, attention_mask=mask, logits=logits, routing=routing)
  np.savez_compressed(os.path.join(directory, "reference.npz"), **ref)
  cfg, params, diff, agree = _jax_parity(directory, ids, mask, ref)
  _check_export(cfg, params, model, ids, mask, logits)
  size = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
  print(f"{name}: {size / 1024:.0f} KiB, router margin {margin:.2e}, minirl_jax max |dlogit| "
        f"{diff:.2e}, routing agreement {agree:.4f}, export reloads in transformers "
        f"{transformers.__version__} exactly")


def main(argv):
  del argv
  jax.config.update("jax_default_matmul_precision", "highest")
  torch.set_num_threads(1)
  transformers.utils.logging.disable_progress_bar()
  for name in FIXTURES:
    make(name, _OUT.value, _SEED.value)


if __name__ == "__main__":
  app.run(main)
