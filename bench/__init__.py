"""Benchmarks: our charlstm pipeline against the Keras tutorial's method, side by side.

Run `python -m bench.run --corpus PATH` (see bench/run.py for the flags).
"""
