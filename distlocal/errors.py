"""User-facing errors: a mistake in the input, printed as one line by the entry point."""


class ConfigError(ValueError):
    """A wrong config value, unknown name or missing input; its message says what to do.

    The entry point prints ``distlocal: error: <message>`` on one line and exits with code 2,
    before anything in the run directory is written.
    """
