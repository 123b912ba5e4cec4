"""User-facing errors: the CLI prints ``kd3: error: <message>`` and exits 2, no traceback."""


class Kd3Error(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2


class ConfigError(Kd3Error):
    pass


class DataError(Kd3Error):
    """A run directory, manifest, shard or checkpoint is missing, corrupt or inconsistent."""
