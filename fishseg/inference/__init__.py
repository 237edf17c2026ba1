"""Trained runs applied to new photos."""
