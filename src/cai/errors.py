"""Exception types. Every message names the file, key or value and what was expected."""


class CaiError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(CaiError):
    """A configuration key is missing, misspelled or holds a value out of range."""


class DataFormatError(CaiError):
    """A galaxy file, partition, manifest or .pt file is not what the format promises."""


class ChecksumError(DataFormatError):
    """A file's bytes differ from the checksum its manifest records."""


class CheckpointError(CaiError):
    """A checkpoint has missing, unexpected or mis-shaped keys, or cannot be read safely."""
