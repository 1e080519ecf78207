"""The one exception type for mistakes a user can fix (config, data file, request).

The CLI prints its message without a stack trace and exits with code 2. The message names the bad
value, the place (field, file:line) and the fix.
"""


class UserError(Exception):
    """A problem in something the user gave us; the message says what, where and how to fix it."""
