"""Name -> constructor registries (timm style), one per kind of model.

A backbone entry also carries its default preprocessing, so anything built by name knows
how its input must look, and the operating points measured for its pretrained weights (read
from its card in `model_cards.json`, see `facelab.models.operating_points`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from facelab.models.operating_points import OperatingPoint, pretrained_operating_points
from facelab.models.preprocess import Preprocess


@dataclass(frozen=True)
class Entry:
    name: str
    constructor: Callable[..., Any]
    preprocess: Preprocess | None

    @property
    def operating_points(self) -> tuple[OperatingPoint, ...]:
        """Thresholds calibrated for this entry's pretrained weights (none without a card)."""
        return pretrained_operating_points(self.name)


class Registry:
    """A named collection of constructors; `register` is used as a decorator."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, preprocess: Preprocess | None = None) -> Callable:
        def decorator(constructor: Callable) -> Callable:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, constructor, preprocess)
            return constructor

        return decorator

    def get(self, name: str) -> Entry:
        _load_builtin_models()
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries))
            raise KeyError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def create(self, name: str, **kwargs: Any) -> Any:
        """Build `name`; options it does not take (a typo in a config) are a ValueError."""
        constructor = self.get(name).constructor
        try:
            inspect.signature(constructor).bind(**kwargs)
        except TypeError as exc:
            raise ValueError(f"{self.kind} {name!r}: {exc}") from None
        return constructor(**kwargs)

    def names(self) -> list[str]:
        _load_builtin_models()
        return sorted(self._entries)


BACKBONES = Registry("backbone")
HEADS = Registry("head")
DETECTORS = Registry("detector")


def _load_builtin_models() -> None:
    """Import the modules whose decorators fill the registries (once, on first lookup)."""
    import facelab.models.backbones  # noqa: F401
    import facelab.models.detectors  # noqa: F401
    import facelab.models.heads  # noqa: F401
