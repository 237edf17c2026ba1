"""Scores, statistics, reports and comparisons of trained runs."""
