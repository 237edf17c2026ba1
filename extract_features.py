"""Stage 1: run the frozen backbone once and write the HDF5 feature cache. Same as `fishseg extract`; see --help."""

from fishseg.cli import extract

if __name__ == "__main__":
    extract(prog_name="extract_features.py")
