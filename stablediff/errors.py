"""The one exception type users see: its message is a complete one-line explanation."""


class UserError(Exception):
    """Bad input from the user: printed as one line by the CLI, never a traceback."""
