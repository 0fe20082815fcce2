"""Pieces of the GPU benchmark (experiments/benchmark.py): architectures with random weights,
timing, the kernel sweep, the per-technique table and the end-to-end runs."""
