"""Training: the loop (loop.py), one step and the reference phase (step.py), the exact global top-k
(selection.py), the twin DeepSpeed engines (engines.py), selection diagnostics (diagnostics.py) and what
of a run goes into a checkpoint (state.py)."""
