"""UserError: a problem with the user's input, which the CLI prints as one line (exit code 2).

A leaf module, so that every layer can raise it without importing the CLI above it.
"""


class UserError(Exception):
    """Bad input from the user: the message names the file, tensor or option and what is wrong."""
