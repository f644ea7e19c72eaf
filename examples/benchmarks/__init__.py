"""Benchmarks and profilers: each a script that prints and saves JSON (and a plot)."""
