"""FLOP-cutting techniques, one per file: a config plus the plain-torch algorithm (the oracle)."""

import importlib


class OptionError(ValueError):
    """A bad request option; ``field`` is the path of the offending field (what an HTTP 400 names)."""

    def __init__(self, message: str, field: str):
        super().__init__(message, field)
        self.message, self.field = message, field

    def __str__(self) -> str:
        return self.message


def fraction(value, field: str, error: type[OptionError]) -> float:
    """A share of tokens to keep, a number in (0, 1]; anything else raises ``error`` naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{field} must be a number in (0, 1], got {value!r}", field)
    if not (0 < value <= 1):  # NaN fails this too
        raise error(f"{field} must be in (0, 1], got {value}", field)
    return float(value)


class Registry:
    """Names -> the classes of one technique's methods (kvpress-style explicit registry). Each method's file
    registers itself with :meth:`register`; ``modules`` are imported on first lookup so they have."""

    def __init__(self, label: str, field: str, error: type[OptionError], modules: tuple[str, ...]):
        self.label, self.field, self.error, self.modules = label, field, error, modules
        self.classes: dict[str, type] = {}

    def register(self, name: str):
        def wrap(cls):
            self.classes[name] = cls
            return cls

        return wrap

    def _load(self) -> None:
        for module in self.modules:
            importlib.import_module(module)

    def names(self) -> list[str]:
        self._load()
        return sorted(self.classes)

    def get(self, name):
        """An instance of ``name``'s class; an unknown name (or a JSON list / object) raises ``error``."""
        self._load()
        if not isinstance(name, str) or name not in self.classes:
            raise self.error(
                f"unknown {self.label} {name!r}; choose one of {', '.join(sorted(self.classes))}", self.field
            )
        return self.classes[name]()
