"""minirl_jax's logits and routing for a Hugging Face checkpoint, to compare with a reference.

  python scripts/hf_logits.py --hf_dir=DIR --input=IN.npz --output=OUT.npz
IN holds `input_ids` [B, T] and optionally `attention_mask` [B, T] (0 on left padding).
OUT gets float32 `logits` [B, T, V] and int32 `routing` [L_moe, B, T, k]. docs/hf.md shows
the matching transformers reference.
"""
from absl import app
from absl import flags
import numpy as np

from minirl_jax import hf_io

_HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face checkpoint directory.", required=True)
_INPUT = flags.DEFINE_string("input", None, "npz with input_ids (+ attention_mask).",
                             required=True)
_OUTPUT = flags.DEFINE_string("output", None, "npz to write logits and routing to.",
                              required=True)
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "Parameter dtype; default: the checkpoint's.")
_COMPUTE_DTYPE = flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"],
                                   "Matmul dtype of the forward.")


def main(argv):
  del argv
  with np.load(_INPUT.value) as data:
    input_ids = data["input_ids"]
    mask = data["attention_mask"] if "attention_mask" in data else None
  logits, routing = hf_io.hf_logits(_HF_DIR.value, input_ids, mask, dtype=_DTYPE.value,
                                    compute_dtype=_COMPUTE_DTYPE.value)
  np.savez(_OUTPUT.value, logits=logits, routing=routing)
  print(f"wrote {_OUTPUT.value}: logits {logits.shape}, routing {routing.shape}")


if __name__ == "__main__":
  app.run(main)
