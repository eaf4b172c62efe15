"""User errors: mistakes a user can make (a bad path, a bad flag value, a mismatched file).

Scripts raise `UserError` with one line that says what is wrong and what to do; `litft.cli.run` prints it as
`error: ...` on stderr and exits with status 2 — no traceback, because there is no bug to debug.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line."""
