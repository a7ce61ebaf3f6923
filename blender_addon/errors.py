"""The add-on's user-facing error type (its own module so audio, render and bake share it)."""


class UserError(Exception):
    """A problem the user must fix; the message says what and how."""
