"""Corpus recipes: real text fetched by package name and built into `blade prepare` datasets.

    blade prepare --recipe debian-docs --out data/debian-docs [--quick]
"""


def _debian_docs(out_dir: str, cache: str, size: str = "default", seed: int = 0) -> dict:
    from .debian_docs import build_debian_docs

    return build_debian_docs(out_dir, cache, size=size, seed=seed)


RECIPES = {"debian-docs": _debian_docs}  # name -> build(out_dir, cache, size, seed) -> recipe manifest
