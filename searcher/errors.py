"""The one exception type whose message is fit to show a user."""


class SearcherError(Exception):
    """A problem with the user's input or environment; the CLI prints it as one line, exit 2."""
