"""Benchmarks: medians of repeated runs, with ratios taken within the same run.

Run each as a module from the repository root, e.g. `.venv/bin/python -m
bench.reload --help`: the benchmarks import the test helpers as the package
`tests.support`, and `python -m` puts the current directory on sys.path.
"""
