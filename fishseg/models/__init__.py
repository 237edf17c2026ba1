"""The frozen backbone and the decoder registry."""
