"""Expected failures: the CLI prints these as one line on stderr and exits non-zero."""

from __future__ import annotations


class RnngenError(Exception):
    """A failure the user can fix; its message says how."""

    exit_code = 1


class CorpusError(RnngenError):
    """The training or evaluation text cannot be read or used."""


class ModelError(RnngenError):
    """A model directory is missing, corrupt, or from an unknown format version."""


class UsageError(RnngenError):
    """Options that cannot work together, found after parsing. `field`: the option it is about, by its
    keyword (options.SAMPLE_OPTIONS), so the server can name its own parameter."""

    exit_code = 2

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class Incomplete(RnngenError):
    """A sample reached its length limit before the songs or lines it was asked for were done; the
    text made so far has been written."""

    exit_code = 3


class Diverged(RnngenError):
    """Training produced a non-finite loss or weights; nothing non-finite was saved."""


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM before training's first step: unwinds everything (cleaning up) to the CLI.

    A BaseException, like KeyboardInterrupt, so no `except Exception` on the way swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
