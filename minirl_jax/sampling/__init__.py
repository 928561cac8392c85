"""The inference engine: KV-cached generation in float32 / bfloat16 / int8."""
