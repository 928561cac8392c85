"""The paper's experiments: rounds of ablation grids, run as resumable processes and read by
rules stated before the runs.

One home per rule: `design` (arms, grids), `round1` / `round2` (each round's grids, score and
readers; a new round is a new module), `grids` (every grid by name), `layout` (run names and
dirs), `runner` (processes), `report` (runs read once, the table), `series` (series.csv and
restoring runs from it), `stats` (pure statistics), `rules` (what a verdict is), `checks`
(a contrast checked after its runs, beside its verdict), `early_warning` (signals and their
crossing), `roc` (the signals as classifiers), `figures`.
"""
