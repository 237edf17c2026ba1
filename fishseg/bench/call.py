"""``python -m fishseg.bench.call NAME KEYWORDS``: one public API call, ``fishseg.api.NAME(**KEYWORDS)`` with the
keywords as a JSON object, in a process that torchrun can start.

The benchmark times whole distributed runs through this entry, so that they take the API's own keywords
(checked by the function itself) instead of a command line written by hand.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from fishseg import api
from fishseg.distributed import torchrun_command

__all__ = ["torchrun_call"]

CALLABLE = ("extract", "train")  # the API functions that run in several processes


def torchrun_call(processes: int, name: str, **keywords: Any) -> list[str]:
    """The command line that runs ``fishseg.api.<name>(**keywords)`` in ``processes`` processes (paths are
    passed as text)."""
    if name not in CALLABLE:
        raise ValueError(f"{name}: not one of {', '.join(CALLABLE)}")
    return [*torchrun_command(processes), "-m", __name__, name, json.dumps(keywords, default=str)]


def main(argv: list[str] | None = None) -> None:
    name, keywords = argv if argv is not None else sys.argv[1:]
    if name not in CALLABLE:
        raise SystemExit(f"{name}: not one of {', '.join(CALLABLE)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    getattr(api, name)(**json.loads(keywords))


if __name__ == "__main__":
    main()
