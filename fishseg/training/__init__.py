"""Stage 2: decoders trained from the cache alone; cross-validation and sweeps."""
