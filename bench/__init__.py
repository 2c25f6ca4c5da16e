"""Benchmarks for pixel-middleware: ``./dev bench`` (see bench/README.md).

Every figure is a ratio measured side by side in the same run: the thing under
test and its baseline are interleaved, repeated, and the medians compared, so that
a machine shared with other work slows both alike.
"""
