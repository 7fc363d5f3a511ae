"""Data pruning: DeltaLoss scoring (score.py), per-dataset selection and outputs (select.py), ``nvila prune`` (cli.py)."""
