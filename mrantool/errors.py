"""User-facing errors: one sentence naming the file and the fix; the CLI prints them without a traceback."""


class MrantoolError(Exception):
    """An error caused by the user's input, with a message that says what to do about it."""


class SlideError(MrantoolError):
    """A slide file cannot be read or has no usable metadata."""


class MissingMppError(SlideError):
    """A slide has no microns-per-pixel metadata and none was given."""


class StoreError(MrantoolError):
    """A feature store is missing, damaged, or was written with another encoder, geometry or schema."""


class LockedError(StoreError):
    """Another live extractor holds the lock on a slide."""


class ConfigError(MrantoolError):
    """A configuration file or option is invalid."""


class LabelsError(MrantoolError):
    """A labels file is malformed or does not match the store."""


class FileSystemError(MrantoolError):
    """An operating-system failure the user can fix: a full disk, a read-only folder, a file where a folder belongs."""
