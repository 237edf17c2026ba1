"""Stage 3: score a trained run on its validation split and write the report. Same as `fishseg evaluate`; see --help."""

from fishseg.cli import evaluate

if __name__ == "__main__":
    evaluate(prog_name="evaluate.py")
