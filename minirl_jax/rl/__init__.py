"""The synchronous RL trainer: rollouts, train step, cold-start SFT and the outer loop."""
