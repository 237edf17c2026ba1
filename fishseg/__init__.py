"""fishseg: fish segmentation from frozen, cached self-supervised features."""

__version__ = "0.1.0"
