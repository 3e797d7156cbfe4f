"""`blade experiment` (quarantined: depends on the core, never the other way round): the staged
full / random / rho1 / blade comparison (run.py) and its report (report.py)."""
