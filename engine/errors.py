"""The one exception type the CLI turns into a one-line error and a non-zero exit."""


class DepthcutError(Exception):
    """Bad input or an unusable model: the message is meant for the user, verbatim."""
