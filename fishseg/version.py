"""The fishseg version, recorded in every cache, run and sweep it writes (its own module, so that the stages
record it without importing the public API from the package)."""

__version__ = "0.1.0"
