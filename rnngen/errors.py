"""Expected failures: the CLI prints these as one line on stderr and exits non-zero."""


class RnngenError(Exception):
    """A failure the user can fix; its message says how."""

    exit_code = 1


class CorpusError(RnngenError):
    """The training or evaluation text cannot be read or used."""


class ModelError(RnngenError):
    """A model directory is missing, corrupt, or from an unknown format version."""


class UsageError(RnngenError):
    """Options that cannot work together, found after parsing."""

    exit_code = 2
