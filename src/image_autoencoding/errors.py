"""The one exception type the CLI turns into a one-line message and exit status 2."""


class UserError(ValueError):
    """A problem the user can fix (bad config, missing dataset, unreadable checkpoint).

    The message is one line and names the file or key and what was expected.
    """


def quoted(name: object) -> str:
    """A file name (or any user-given name) for a one-line message: in single quotes as usual, or
    escaped repr-style when it holds a newline or another unprintable character, which would break
    the message's one line (a file may legally be named "a\\nb.jpg")."""
    text = str(name)
    return f"'{text}'" if text.isprintable() else repr(text)
