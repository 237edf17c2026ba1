"""Images and masks on disk, pixel classes, splits and generated photos."""
