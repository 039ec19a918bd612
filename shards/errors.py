"""Errors a user can cause with their data; the command line turns each into one paragraph and an exit status."""


class ShardsError(Exception):
    """Base class: a problem with the user's files, explained in the message."""


class BadSourceError(ShardsError):
    """The source folder or the arguments are not usable (exit status 2): nothing was written."""


class CorruptShardError(ShardsError):
    """A shard does not match its manifest, or a sample in it cannot be read (exit status 1)."""
