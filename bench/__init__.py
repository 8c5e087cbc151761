"""Benchmarks that print comparison tables (`make bench`); not timed tests."""
