"""Benchmarks: what `fishseg bench` measures."""
