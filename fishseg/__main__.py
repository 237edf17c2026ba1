"""``python -m fishseg`` (and ``torchrun -m fishseg``): the same commands as the ``fishseg`` script."""

from fishseg.cli import main

main(prog_name="fishseg")
