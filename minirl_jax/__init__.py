"""minirl_jax: MiniRL (Zheng et al., 2025) for Mixture-of-Experts language models in JAX."""
