"""User-facing errors: the CLI prints these as one short message instead of a traceback."""


class SpikepruneError(Exception):
    """Something the user gave us is wrong; the message says what, and what to do instead."""
