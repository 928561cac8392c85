"""The inference engine: KV-cached generation in float32 / bfloat16 / float16 / int8 /
fp8 / int4, and the train-infer gap each opens (`gap`)."""
