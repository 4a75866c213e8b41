"""Experiments: a grid of runs (grid, spec, study file), run in turn (runner), with reference rows and a
leakage check (references) and their results collected from disk (results). The report renders them."""
