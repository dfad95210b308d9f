"""User-facing errors: the CLI turns these into exit code 2 and a one-line message."""


class EmoteError(Exception):
    """Bad input or configuration that the user can fix (missing file, wrong option, bad model dir)."""


class CheckpointError(EmoteError):
    """A model directory is missing a file, or a file does not match the config."""
