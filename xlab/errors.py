"""The one exception type for mistakes a user can fix.

The executables turn it into a single line on stderr and a non-zero exit, so
raise it with a message that says what to change, never for programming errors.
"""


class UserError(Exception):
    """A problem with the user's input, configuration or files."""
