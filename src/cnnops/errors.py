"""Errors a user can fix; the CLI prints their message and exits with status 2."""


class CnnopsError(Exception):
    """Bad input: the message names the key or file, the value and what is allowed."""


class ConfigError(CnnopsError):
    pass


class DataError(CnnopsError):
    pass


class RegistryError(CnnopsError):
    """The model registry is unreachable, or a model, version or alias it should hold is missing."""
