"""Errors with a user-facing reason. The CLI prints ``str(err)`` and exits non-zero."""


class SparkleError(Exception):
    """Base class of every error the project raises on purpose."""


class InputError(SparkleError):
    """Bad user input (missing, empty or undecodable file, empty prompt, bad option). HTTP 4xx / exit 1."""


class ConfigError(SparkleError):
    """A configuration value or backend name is invalid, or a backend cannot start."""


class ArtifactMissing(InputError):
    """A referenced artifact key is not in the store. HTTP 404."""


class TooLarge(InputError):
    """An input exceeds a configured limit (body bytes, frames, pixels). HTTP 413."""


class NotReady(SparkleError):
    """The service is loading, failed to load, or its queue is full. HTTP 503 with Retry-After."""


class ServiceRejected(SparkleError):
    """A model service refused a request for good (HTTP 4xx: bad input, missing artifact). Not retried; the
    sample fails with the service's reason."""


class ServiceUnavailable(SparkleError):
    """A model service stayed unavailable (503, 504, 5xx, connection errors) through every retry."""


class InvalidKey(InputError, ValueError):
    """An artifact key that is absolute or leaves the store (``..``): bad input (HTTP 400), also a ValueError."""

