"""Stage 1: the backbone runs once over every image into the cache."""
