"""A name -> object registry, shared by the model, dataset and PINN-model registries.

MODELS = Registry("model")

@MODELS.register("vit_micro")
def build(activation="softmax", **overrides): ...

MODELS.get("vit_micro")     # the builder
MODELS.get("vit_mirco")     # ValueError: unknown model 'vit_mirco' (did you mean 'vit_micro'?); known models: ...
MODELS.entry("vit_micro").meta  # the keywords given to register (e.g. a dataset's defaults)
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Generic, TypeVar

__all__ = ["Entry", "Registry"]

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered object and the metadata it was registered with."""

    name: str
    obj: T
    meta: Mapping[str, Any]


class Registry(Generic[T]):
    """Objects of one kind by name; unknown names fail with the close matches and the known names.

    ``kind`` names the entries in messages ("model" -> "unknown model 'x'; known models: ...").
    ``error`` is the exception raised for an unknown name, so a registry can keep the error type
    its callers already catch (datasets raise ``DatasetError``). ``hint`` is appended to that
    message, for names the registry resolves without listing them (``timm:<name>``).
    """

    def __init__(self, kind: str, error: type[Exception] = ValueError, hint: str = "") -> None:
        self.kind = kind
        self.error = error
        self.hint = hint
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, **meta: Any) -> Callable[[T], T]:
        """Decorator registering its argument as ``name``; ``meta`` is kept on the entry.

        Registering the same object twice is a no-op, so that re-importing a module is harmless;
        another object under a taken name is an error naming the module that took it.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        frozen = MappingProxyType(dict(meta))

        def decorator(obj: T) -> T:
            old = self._entries.get(name)
            if old is not None and old.obj is not obj:
                owner = getattr(old.obj, "__module__", None) or type(old.obj).__module__
                raise ValueError(f"{self.kind} {name!r} is already registered (by {owner})")
            self._entries[name] = Entry(name, obj, frozen)
            return obj

        return decorator

    def entry(self, name: str) -> Entry[T]:
        """The entry registered as ``name``; ``self.error`` naming the close and the known names if none."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):  # TypeError: an unhashable name from a config file
            raise self.error(self._unknown_message(name)) from None

    def get(self, name: str) -> T:
        """The object registered as ``name`` (see :meth:`entry` for the error)."""
        return self.entry(name).obj

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def pop(self, name: str) -> T:
        """Unregister ``name`` and return its object (for entries registered only for a while, as in tests)."""
        return self._entries.pop(name).obj

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._entries
        except TypeError:
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()})"

    def _unknown_message(self, name: object) -> str:
        known = self.names()
        close = difflib.get_close_matches(name, known, n=3) if isinstance(name, str) else []
        guess = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        hint = f" {self.hint}" if self.hint else ""
        return f"unknown {self.kind} {name!r}{guess}; known {self.kind}s: {', '.join(known) or '(none)'}{hint}"
