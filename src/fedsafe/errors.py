"""User-facing errors.

Anything the user can fix (bad config, malformed file, missing asset) raises :class:`FedsafeError`
(or a subclass). The CLI prints its message without a traceback and exits non-zero; everything else
is a bug and keeps its traceback.
"""


class FedsafeError(Exception):
    """An error caused by user input or environment; shown without a traceback."""


class ConfigError(FedsafeError):
    """Invalid configuration value or key."""


class DataError(FedsafeError):
    """Malformed or unusable data file / source."""


class AssetError(FedsafeError):
    """An offline asset is missing, corrupt or cannot be fetched."""
