"""The one exception type of the data package."""


class DatasetError(ValueError):
    """A dataset folder or file cannot be used; the message names the path and the fix."""
