"""The Qwen3-MoE-compatible transformer: pure functions over a params pytree.

Shape suffixes on arrays (the one legend for the whole package):
  B batch, T time (tokens), S cache length, D model width, H query heads, G kv heads,
  K head dim, E experts, k top-k, F ffn width, V vocab, L layers (routing: MoE layers),
  N flattened tokens, M padded dispatch rows.
"""
