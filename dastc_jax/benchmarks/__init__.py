"""Benchmark commands (each prints and writes what it measured)."""
