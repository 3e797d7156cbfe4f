"""Corpus recipes: real text fetched by package name and built into `blade prepare` datasets.

    blade prepare --recipe debian-docs --out data/debian-docs [--quick]    # debian_docs.py
"""
