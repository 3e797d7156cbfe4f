"""Downstream evaluation with EleutherAI's lm-evaluation-harness (`blade eval`; blade/eval/harness.py)."""
