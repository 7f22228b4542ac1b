"""Benchmarks and diagnostics beside the eicl package (not installed with it).

A package so that the tests and `python -m benchmarks.gpu.<tool>` import
them by name; the scripts at this level also run by path
(`python benchmarks/bench_data.py`). GPU planning tools are in gpu/.
"""
