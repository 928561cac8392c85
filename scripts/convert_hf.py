"""Hugging Face Qwen3-MoE checkpoint <-> orbax params (+ model config JSON).

  python scripts/convert_hf.py --hf_dir=HF_DIR --out=OUT [--dtype=bfloat16]
      writes OUT/params (orbax), OUT/model_config.json, OUT/hf_config.json
  python scripts/convert_hf.py --direction=export --orbax_dir=OUT --out=HF_OUT \
      [--params_dir=TRAINED_PARAMS]
      writes HF_OUT/config.json + *.safetensors (per-expert layout)
"""
from absl import app
from absl import flags

from minirl_jax import errors
from minirl_jax import hf_io

_DIRECTION = flags.DEFINE_enum("direction", "import", ["import", "export"],
                               "import: Hugging Face -> orbax; export: orbax -> Hugging Face.")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "import: the Hugging Face checkpoint directory.")
_ORBAX_DIR = flags.DEFINE_string("orbax_dir", None, "export: a directory written by import.")
_PARAMS_DIR = flags.DEFINE_string("params_dir", None,
                                  "export: orbax params to write; default ORBAX_DIR/params.")
_OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "import: parameter dtype; default: the checkpoint's.")
_MAX_SHARD_GB = flags.DEFINE_float("max_shard_gb", 5.0, "export: size bound per safetensors file.")


def main(argv):
  del argv
  if _DIRECTION.value == "import":
    if not _HF_DIR.value:
      raise app.UsageError("--direction=import needs --hf_dir")
    cfg = hf_io.hf_to_orbax(_HF_DIR.value, _OUT.value, dtype=_DTYPE.value)
  else:
    if not _ORBAX_DIR.value:
      raise app.UsageError("--direction=export needs --orbax_dir")
    cfg = hf_io.orbax_to_hf(_ORBAX_DIR.value, _OUT.value, params_dir=_PARAMS_DIR.value,
                            max_shard_bytes=int(_MAX_SHARD_GB.value * 2**30))
  print(f"{_DIRECTION.value}ed {cfg.num_layers} layers, {cfg.num_experts} experts -> {_OUT.value}")


if __name__ == "__main__":
  errors.run(main)
