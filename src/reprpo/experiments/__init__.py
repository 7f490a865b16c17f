"""Experiments over many runs: compare grids, the SQLite results store, reports, hyper-parameter tuning."""
