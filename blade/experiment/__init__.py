"""`blade experiment` (quarantined: depends on the core, never the other way round): the staged
full / random / rho1 / blade comparison (run.py) with its seeds and --grid points (grid.py), the
single-run report (report.py) and the report over seeds (study.py, with stats.py)."""
