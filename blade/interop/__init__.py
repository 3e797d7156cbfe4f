"""Other formats: pretrained checkpoints in (pretrained.py, over hf.py and gguf.py), blade checkpoints out
as fp32 safetensors (export.py) and as a Hugging Face directory (export_hf.py)."""
