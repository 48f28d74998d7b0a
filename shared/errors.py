"""Errors about the user's data: each message names the file (and row or key) and what was expected."""


class DataFormatError(ValueError):
    """A data file that does not match the format it should have; the message names the file."""
