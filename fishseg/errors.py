"""The one exception type for problems a user can fix (bad input, mismatched files), and how its message
names options.

The CLI turns it into a one-line message and exit status 2; anything else is a bug and keeps
its traceback. A message names an option as the API's keyword in backticks (`lr`, `overwrite=True`,
`stream=False`, `folds=3`), which is what a notebook user types; ``render_flags`` rewrites those to the
command line's flags (--lr, --overwrite, --in-memory, --cv 3) for the CLI, so that each reader is told
what they would type.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping

__all__ = ["FishsegError", "TrainingFailed", "Flag", "render_flags"]


class FishsegError(Exception):
    """A problem with the user's input: the message names the file and what to do."""


class TrainingFailed(FishsegError):
    """Training itself failed (a non-finite loss): the run is recorded as failed, not as interrupted."""


@dataclasses.dataclass(frozen=True)
class Flag:
    """A keyword's command-line option: ``on`` for the keyword, its value or ``=True``; ``off`` (a click
    ``--on/--off`` switch's second name, if any) for ``=False``."""

    on: str
    off: str | None = None

    def __post_init__(self) -> None:
        for name in (self.on, self.off):
            if name is not None and not name.startswith("--"):
                raise ValueError(f"{name!r}: a flag starts with --")


KEYWORD = re.compile(r"`([a-z_][a-z0-9_]*)(?:=([^`]*))?`")  # `name` or `name=value`, as messages write them
_PLAIN = re.compile(r"[\w.,:/+=@%~-]+")  # a quoted value that reads the same unquoted on a command line


def render_flags(message: str, flags: Mapping[str, Flag]) -> str:
    """``message`` with each backticked keyword of ``flags`` as its flag: `name` and `name=True` → the flag,
    `name=False` → its negative flag (left as is where there is none), `name=value` → "flag value", the value
    as typed on a command line ("cpu" for 'cpu', 6,9,12 for (6, 9, 12)). Names not in ``flags`` stay as they
    are."""

    def flag(match: re.Match[str]) -> str:
        name, value = match.groups()
        option = flags.get(name)
        if option is None:
            return match.group(0)
        if value is None or value == "True":
            return option.on
        if value == "False":
            return option.off or match.group(0)
        return f"{option.on} {_typed(value)}"

    return KEYWORD.sub(flag, message)


def _typed(value: str) -> str:
    """A Python value as the command line takes it: a plain string unquoted, a tuple or list as a comma list."""
    if value[:1] + value[-1:] in ("()", "[]"):
        return ",".join(_typed(item.strip()) for item in value[1:-1].split(",") if item.strip())
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"" and _PLAIN.fullmatch(value[1:-1]):
        return value[1:-1]
    return value
