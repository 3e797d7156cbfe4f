"""blade: distributed LLM pretraining on DeepSpeed with online token-level data selection (BLADE)."""

__version__ = "0.1.0"
