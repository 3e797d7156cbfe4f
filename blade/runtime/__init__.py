"""What a distributed run stands on: the process group and small collectives (dist.py), ZeRO partition
internals (zero.py), checkpoint files (checkpoint.py) and resharding (reshard.py), preemption (preempt.py),
test-only fault injection (faults.py), phase timing (timing.py) and the metrics log (metrics.py)."""
