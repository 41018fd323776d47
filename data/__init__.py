"""Data pipeline: prepare.py writes token shards, loader.py reads them."""
