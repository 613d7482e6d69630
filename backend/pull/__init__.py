"""Pulling models: sources (URLs, Hugging Face), resumable verified downloads, the registry of
running pulls and the record of what corral pulled (which `corral rm` may delete).

The modules: sources.py (what a source names), transfer.py (one file's bytes), job.py (one
pull, start to finish), registry.py (single flight, cancel, rm), record.py (pulled.json),
status.py (the progress record every face shows).
"""
