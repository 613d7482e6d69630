"""Benchmarks: scripts that print tables of ratios. Not part of the default pytest run."""
