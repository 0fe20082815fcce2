"""Pieces of the GPU benchmark (experiments/benchmark.py): architectures with random weights,
the kernel sweep, the per-technique table and the end-to-end runs; and two kernel probes."""
