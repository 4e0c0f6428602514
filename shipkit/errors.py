"""The one exception hierarchy. Every message is meant for the user: it names the file,
tensor or field at fault and, where there is one, the fix. The CLI prints it on one line."""

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2


class ShipkitError(Exception):
    """Base class; `exit_code` is what the CLI exits with."""

    exit_code = EXIT_CHECK_FAILED


class InputError(ShipkitError):
    """Bad input from the user: a missing file, a wrong column, an unsupported option."""

    exit_code = EXIT_USAGE


class IntegrityError(ShipkitError):
    """A file failed a check: corrupt, truncated, or inconsistent with its own index."""


class TrainingError(ShipkitError):
    """Training stopped for a reason the evidence records (NaN loss, divergence, empty stream)."""


class GateFailed(ShipkitError):
    """A release gate failed (parity, contract, card)."""


class HubError(ShipkitError):
    """The Hub refused or failed a request (bad token, interrupted upload, verification mismatch)."""
