"""Ablation grids: named arms derived from one base config, run as resumable processes."""
