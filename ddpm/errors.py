"""The one exception type for mistakes a user can fix.

Library code raises ``UserError`` with a message that says what went wrong and
how to fix it; the scripts print it as ``error: <message>`` on stderr and exit
with status 2, without a traceback and before writing anything.
"""


class UserError(Exception):
    """A bad file, flag or value: reported in one line, exit status 2."""
