"""The user-facing error type, in a module of its own so that every layer (config, cache, ops, loader) can raise
it without importing another: no import circles."""


class ConfigError(ValueError):
    """A user-facing configuration error (bad flag, bad size, unknown name). The CLI prints it in one line."""
