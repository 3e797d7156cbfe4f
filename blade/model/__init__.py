"""The Llama-style transformer (transformer.py) and its FLOP count (flops.py)."""
