"""Errors a user can act on: the CLI prints them as one line, never as a traceback."""


class UserError(Exception):
    """A problem in the user's input or environment; the message names it and the fix."""
