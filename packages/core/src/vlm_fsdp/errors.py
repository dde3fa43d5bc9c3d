"""Errors that mean "the user asked for something wrong": the CLI prints them without a traceback."""


class UserError(Exception):
    """A mistake in the user's input (config, command line, files); the message says how to fix it."""


class ConfigError(UserError):
    """An invalid config key, value or combination of values."""
