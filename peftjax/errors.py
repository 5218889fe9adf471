"""User-facing errors.

Every mistake a user can make (bad config key, unknown format, missing file, a rule that matches nothing) raises
:class:`PeftjaxError` with a one-line message that says what was wrong and how to fix it. The CLI prints that line
and exits with status 2; anything else is a bug and keeps its traceback.
"""


class PeftjaxError(ValueError):
    """A problem with the user's input, reported as one line (the CLI exits with status 2)."""
