"""Errors with a sentence a person understands. The node maps each to a status."""


class NextChatError(ValueError):
    """Base class of every refusal the core raises for bad input."""


class ImageError(NextChatError):
    """The image cannot be used (wrong shape, type, size, or not set)."""


class QueryError(NextChatError):
    """The query text or its regions cannot be used."""


class ModelFileError(NextChatError):
    """A model file is missing, truncated or does not match its config."""


class UsageError(NextChatError):
    """A command was given options that do not fit together."""


class BackendError(NextChatError):
    """An exported graph or engine cannot be used; the message names the file."""
