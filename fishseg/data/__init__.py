"""Images on disk, splits and generated photos."""
