"""`blade bench` (quarantined: depends on the core, never the other way round): the interleaved
strategy benchmark (run.py), its probes (probes.py) and its report (report.py)."""
