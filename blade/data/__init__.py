"""Data: the shard reader and its resumable streams (reader.py), `blade prepare` (prepare.py), tokenizers
(tokenizer.py), the built-in corpus (corpus.py) and the real-data recipes (recipes/)."""
