"""Tasks, tokenizers, grain input pipelines and reward functions."""
