"""ghostmatch benchmarks: ``python -m benchmarks [--quick] [--only NAME ...] [--weights W]``.

Each benchmark measures its figures beside a baseline taken in the same run (the machine
may be busy), writes ``results/<name>.json`` and adds a table to ``results/summary.md``.
"""
