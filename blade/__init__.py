"""blade: distributed LLM pretraining on DeepSpeed with online token-level data selection (BLADE)."""

__version__ = "0.1.0"

import os as _os

# the checkout blade runs from (an editable install): configs/ and launch/ live here
ROOT = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
