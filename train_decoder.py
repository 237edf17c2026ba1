"""Stage 2: train a decoder from the cached features only. Same as `fishseg train`; see --help."""

from fishseg.cli import train

if __name__ == "__main__":
    train(prog_name="train_decoder.py")
