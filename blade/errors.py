"""User-facing errors: the CLI prints these as one line (no traceback) and exits with status 2."""


class BladeError(Exception):
    """A mistake in the user's input (config, data, files) with a message that names the fix."""


class ConfigError(BladeError):
    """Invalid configuration: unknown key, wrong type, out-of-range value, missing file."""


class DataError(BladeError):
    """Invalid or unreadable data: corrupt/truncated/empty shard, bad manifest, token id out of range."""


class CheckpointError(BladeError):
    """A checkpoint that cannot be used: incomplete, corrupt, or from an incompatible run."""


class DataExhausted(Exception):
    """A training dataset is used up and data.on_exhausted=stop: the loop ends the run there (not an error)."""
