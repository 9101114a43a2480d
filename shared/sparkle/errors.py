"""Errors with a user-facing reason. The CLI prints ``str(err)`` and exits non-zero."""


class SparkleError(Exception):
    """Base class of every error the project raises on purpose."""


class InputError(SparkleError):
    """Bad user input (missing, empty or undecodable file, empty prompt, bad option). HTTP 4xx / exit 1."""


class ConfigError(SparkleError):
    """A configuration value or backend name is invalid, or a backend cannot start."""
