"""User-facing errors: each message names the file, row or field at fault and what to do."""


class ReprpoError(Exception):
    """Base class for errors the user can cause and fix (bad data, bad config, missing model)."""


class DataError(ReprpoError):
    """A data source could not be read or validated."""


class ConfigError(ReprpoError):
    """A configuration field is missing, unknown or has a bad value."""


class ModelError(ReprpoError):
    """A model could not be found, downloaded or converted."""


class TrainingError(ReprpoError):
    """Training cannot go on: non-finite losses or gradients, a run directory in use, a
    checkpoint that does not match the run."""
