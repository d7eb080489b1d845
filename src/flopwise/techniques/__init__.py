"""FLOP-cutting techniques, one per file: a config plus the plain-torch algorithm (the oracle)."""


class OptionError(ValueError):
    """A bad request option; ``field`` is the path of the offending field (what an HTTP 400 names)."""

    def __init__(self, message: str, field: str):
        super().__init__(message, field)
        self.message, self.field = message, field

    def __str__(self) -> str:
        return self.message
