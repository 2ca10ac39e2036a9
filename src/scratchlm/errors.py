"""The one exception type for mistakes a user can fix (bad input, missing file, bad config).

The CLI prints a `UserError` as one line and exits with status 2, with no traceback; anything
else is a bug in scratchlm and keeps its traceback. Not for internal invariants (use assert).
"""


class UserError(Exception):
    """A problem with the user's input, named clearly enough to fix without a traceback."""
