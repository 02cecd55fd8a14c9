"""Errors that mean "these settings cannot work" (exit 2 with the message, no traceback).

Bad input *data* is :class:`gte_jax.textio.InputError`; a model spec that names nothing is
:class:`gte_jax.workdir.ModelNotFoundError`."""


class ConfigError(ValueError):
    """A config file or an override that cannot be applied; the message says what to change."""


class TrainingError(RuntimeError):
    """The run cannot start or go on with this config / input; the message says what to do."""


class CheckpointError(RuntimeError):
    """No checkpoint in a workdir could be restored."""
