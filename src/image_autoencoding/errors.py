"""The one exception type the CLI turns into a one-line message and exit status 2."""


class UserError(ValueError):
    """A problem the user can fix (bad config, missing dataset, unreadable checkpoint).

    The message is one line and names the file or key and what was expected.
    """
