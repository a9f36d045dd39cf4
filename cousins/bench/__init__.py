"""Benchmarks, measured in one run and printed as ratios."""
