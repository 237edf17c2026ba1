"""The one exception type for problems a user can fix (bad input, mismatched files).

The CLI turns it into a one-line message and exit status 2; anything else is a bug and keeps
its traceback.
"""


class FishsegError(Exception):
    """A problem with the user's input: the message names the file and what to do."""


class TrainingFailed(FishsegError):
    """Training itself failed (a non-finite loss): the run is recorded as failed, not as interrupted."""
